"""Training throughput of the `small` generator on this machine: with and without pre-encoding, fp32 and bf16.

Prints one JSON line per case. Data: 128 synthetic 64x64 images with captions; the VQGAN is the `small`
preset with random weights (its speed does not depend on its training). Throughput is measured over
`--steps` steps after `--warmup` steps, by the trainer's own samples/s counter.

    python benchmarks/train_speed.py [--steps 20] [--batch 32]
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--warmup', type=int, default=4)   # 4 x 32 = every caption cached once
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--compile', action='store_true', help='also pre-encoded bf16 under torch.compile (slow start)')
    args = p.parse_args()
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    import synth
    from paella.conditioning import minilm_encoder
    from paella.train import GeneratorConfig, preencode, train
    from paella.vq import VQModel

    tmp = Path(tempfile.mkdtemp())
    folder = tmp / 'images'
    folder.mkdir()
    for i in range(32):
        for colour in synth.COLOURS:
            for shape in synth.SHAPES[:1]:
                name = f'{colour}_{shape}_{i}'
                synth.shape_image(colour, shape, 64).rotate(i * 11).save(folder / f'{name}.png')
                (folder / f'{name}.txt').write_text(f'a {colour} {shape} turned {i * 11} degrees')
    torch.manual_seed(0)
    VQModel(VQModel.make_config('small')).save_pretrained(tmp / 'vq')
    preencode(folder, tmp / 'pre.safetensors', VQModel.from_pretrained(tmp / 'vq'), minilm_encoder(), image_size=64)

    cases = [('pre-encoded', 'bf16', False), ('pre-encoded', 'fp32', False), ('raw images', 'bf16', False),
             ('raw images', 'fp32', False)] + ([('pre-encoded', 'bf16', True)] if args.compile else [])
    for data, precision, compiled in cases:
        out = tmp / f'run-{data[:3]}-{precision}-{compiled}'
        cfg = GeneratorConfig(**{'data': str(tmp / 'pre.safetensors') if data == 'pre-encoded'
                             else str(folder), 'vqgan': str(tmp / 'vq'), 'out': str(out), 'precision': precision,
                             'batch_size': args.batch, 'steps': args.warmup, 'save_every': 10 ** 9,
                             'log_every': 10 ** 9, 'tensorboard': False, 'image_size': 64, 'compile': compiled})
        train(cfg)                                            # warm-up (and text-cache fill), then resume
        cfg.steps, cfg.save_every = args.warmup + args.steps, 10 ** 9
        train(cfg)
        rows = [json.loads(line) for line in open(out / 'metrics.jsonl')]
        print(json.dumps({'case': 'train', 'preset': 'small', 'data': data, 'precision': precision,
                          'compile': compiled, 'fused_adamw': torch.device(cfg_device()).type == 'cuda',
                          'batch': args.batch, 'steps': args.steps,
                          'samples_per_s': round(rows[-1]['samples_per_s'], 1),
                          'threads': torch.get_num_threads()}), flush=True)


def cfg_device():
    return 'cuda' if torch.cuda.is_available() else 'cpu'


if __name__ == '__main__':
    main()
