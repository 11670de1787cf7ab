"""The golden outputs that prove a refactor changed nothing: the default model's tokens in every mode, and the
final weights of a tiny training run of each recipe. `tests/test_golden.py` recomputes them and compares
bit for bit; `python tests/golden.py` writes them again (only for a deliberate change of behaviour, in a
commit of its own that says which entries changed and why).

The model runs in float32 (its weights ship in float16, so float32 loses nothing; bfloat16 kernels would
add their own rounding); token draws use seeded generators; training runs in fp32 on one process; both on
one thread (a thread count splits float32 sums differently). Float32
kernels still sum in a CPU-dependent order (an Intel Xeon and an AMD Zen 4 differ in the last bits, which
flips a near-tie token here and there and moves tiny-run weights by ~1e-4), so each file records the
processor it was written on (`machine()`): there the test is bit for bit; elsewhere it allows that noise.
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / 'golden'
sys.path[:0] = [str(HERE.parent), str(HERE)]      # this checkout's paella, whatever is installed


def machine():
    """The processor model (Linux /proc/cpuinfo), else the platform's name for it."""
    import platform
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pictures():
    """Inputs for the editing modes: a drawn picture at the model's 256 px, its right half as a mask, and the
    same picture with a transparent background."""
    import synth
    image = synth.shape_image('red', 'circle', 256)
    mask = np.zeros((256, 256), bool)
    mask[:, 128:] = True
    rgba = image.convert('RGBA')
    alpha = Image.new('L', (256, 256), 0)
    alpha.paste(255, (48, 48, 208, 208))
    rgba.putalpha(alpha)
    return image, mask, rgba


def model_outputs():
    """{entry: token grid} for every mode of the default model."""
    from paella.pipeline import Pipeline
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _model_outputs(Pipeline.from_pretrained(dtype=torch.float32))
    finally:
        torch.set_num_threads(threads)


def _model_outputs(pipe):
    image, mask, rgba = pictures()
    t = dict(output='tokens')
    return {
        'generate': pipe(['red apple', 'a cat wearing sunglasses'], seed=0, **t),
        'generate_seed1': pipe(['rocket'], seed=1, **t),
        'negative_prompt': pipe(['red apple'], negative_prompt='green', seed=2, **t),
        'cfg_schedule': pipe(['rocket'], seed=3, cfg=(4.0, 1.0), **t),
        'cfg_constant': pipe(['snowman'], seed=3, cfg=2.0, steps=8, **t),
        'inpaint': pipe.inpaint(image, mask, 'banana', seed=4, **t),
        'outpaint': pipe.outpaint(image, 'green apple', (512, 256), 'left', seed=5, **t),
        'edit': pipe.edit(image, 'tomato', 0.5, seed=6, **t),
        'edit_transparent': pipe.edit(rgba, 'tomato', 0.5, seed=6, **t),
        'variations': pipe.variations(image, 2, '', 0.6, seed=7, **t),
        'interpolate': pipe.interpolate('red apple', 'green apple', 3, 'slerp', seed=8, **t),
        'regional': pipe.regional([('red apple', (0, 0, 256, 256)), ('banana', (256, 0, 512, 256))], (512, 256),
                                  seed=9, **t),
    }


def training_outputs():
    """{recipe.parameter: final weight} of a tiny fp32 run of each recipe, through the command line."""
    import synth
    from safetensors.torch import load_file
    repo = HERE.parent
    env = {**os.environ, 'PYTHONPATH': str(repo), 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {
            'generator': ('train', synth.preencoded_tokens(tmp / 'tokens.safetensors', n=8), []),
            'vqgan': ('train-vq', synth.image_folder(tmp / 'shapes', 32), ['--image_size=32']),
            'prior': ('train-prior', synth.preencoded_pairs(tmp / 'pairs.safetensors'), []),
        }
        for recipe, (command, data, extra) in runs.items():
            run = tmp / recipe
            subprocess.run([sys.executable, '-m', 'paella.cli', command, f'--data={data}', f'--out={run}',
                            '--preset=tiny', '--steps=12', '--batch_size=4', '--lr=1e-3', '--warmup=2',
                            '--precision=fp32', '--tensorboard=false', '--log_every=4', '--save_every=1000',
                            *extra], check=True, env=env, capture_output=True)
            weights = next((run / 'model').glob('*.safetensors'))
            out.update({f'{recipe}.{k}': v for k, v in load_file(str(weights)).items()})
    return out


def write():
    from safetensors.torch import save_file
    GOLDEN.mkdir(exist_ok=True)
    meta = {'machine': machine()}
    for name, outputs in (('default_model_tokens', model_outputs()), ('training_weights', training_outputs())):
        save_file({k: v.contiguous() for k, v in outputs.items()}, str(GOLDEN / f'{name}.safetensors'), meta)


if __name__ == '__main__':
    write()
