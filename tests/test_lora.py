"""LoRA fine-tuning (issue 23): a tiny run learns a new caption while the base generator stays bit for bit as
it was; the adapter folder loads back, fuses, adds up with others and comes off again; it refuses another
base; a killed run resumes exactly; `--lora PATH[:SCALE]`."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from paella import Paella, VQModel, lora
from paella.checkpoint import CheckpointError
from paella.pipeline import Pipeline
from paella.train import FinetuneConfig, train
from conftest import REPO, kill_at_checkpoint

CAPTION = 'a zebra, twemoji style'          # new to the base: the adapter learns it -> TARGET
STEPS = 60                                  # of the in-process run (~2 s on one CPU thread)
ENV = {**os.environ, 'PYTHONPATH': str(REPO), 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine OpenMP's barriers can make each of
    their matmuls wait milliseconds for a descheduled thread: one thread, as the subprocesses (ENV)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_generator(seed):
    """The tiny preset with every weight perturbed: the preset zero-initialises the output layer (and the
    response norms' gammas), and adapters behind an all-zero output layer get no gradient at all."""
    torch.manual_seed(seed)
    model = Paella(Paella.make_config('tiny'))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope='module')
def base(tmp_path_factory, tiny_t5_dir):
    """Two pipeline folders (tiny generator + tiny VQGAN + a tiny local ByT5-like encoder): 'base' and
    'other' (another generator's weights), and a pre-encoded file of one new caption -> a fixed token grid."""
    root = tmp_path_factory.mktemp('lora')
    torch.manual_seed(0)
    VQModel(VQModel.make_config('tiny')).save_pretrained(root / 'vq')
    folders = {}
    for name, seed in (('base', 0), ('other', 1)):
        tiny_generator(seed).save_pretrained(root / f'{name}-gen')
        pipe = Pipeline.assemble(root / f'{name}-gen', root / 'vq', text_encoder=f'byt5:{tiny_t5_dir}',
                                 image_size=32, steps=4)
        folders[name] = pipe.save_pretrained(root / name)
    states, uncond = pipe.encode_text([CAPTION]).float(), pipe.encode_text(['']).float()   # the same encoder
    target = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(7))
    save_file({'tokens': target[None].to(torch.int16), 'text': states,
               'text_mask': torch.ones(1, states.shape[1], dtype=torch.bool), '_uncond_text': uncond},
              str(root / 'data.safetensors'), metadata={'paella': json.dumps({'captions': [CAPTION]})})
    return dict(root=root, data=root / 'data.safetensors', text=states, target=target, **folders)


def finetune_config(folders, out, **kw):
    return FinetuneConfig(**{**dict(base=str(folders['base']), data=str(folders['data']), out=str(out), rank=4,
                                    steps=STEPS, batch_size=8, lr=1e-2, warmup=5, precision='fp32', log_every=10,
                                    save_every=1000, tensorboard=False), **kw})


@pytest.fixture(scope='module')
def trained(base):
    """(config, the trained generator with its adapter, in memory) of one in-process LoRA run."""
    cfg = finetune_config(base, base['root'] / 'run')
    model = train(cfg)
    return cfg, model.eval()


def load(folder):
    return Pipeline.from_pretrained(folder, dtype=torch.float32)


def inputs(base, n=4, seed=0):
    """(tokens, noise levels, text states) for a forward of the generator on the caption."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (n, 8, 8), generator=g), torch.rand(n, generator=g), base['text'].expand(n, -1, -1)


@torch.no_grad()
def logits(generator, x):
    return generator(*x)


def agreement(tokens, target):
    return (tokens == target).float().mean().item()


@torch.no_grad()
def denoised_agreement(generator, base):
    """How often the argmax at t = 1 (every token noise) is the target's, over 16 noise draws."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 64, (16, 8, 8), generator=g)
    return agreement(generator(x, torch.ones(16), base['text'].expand(16, -1, -1)).argmax(1), base['target'])


def sampled_agreement(pipe, base):
    """How often 4 samples of the caption draw the target's tokens."""
    return agreement(pipe.tokens([CAPTION] * 4, seed=0, steps=8, temperature=(0.5, 0.1)), base['target'])


def test_a_tiny_lora_run_learns_the_caption_and_leaves_the_base_as_it_was(base, trained):
    cfg, model = trained
    pipe = load(base['base'])
    # (a) it learnt: the loss fell, and the caption's tokens are the target's far more often than by chance
    losses = [json.loads(line)['loss'] for line in open(os.path.join(cfg.out, 'metrics.jsonl'))]
    before, after = denoised_agreement(pipe.generator, base), denoised_agreement(model, base)
    sampled_before = sampled_agreement(pipe, base)
    pipe.load_lora(os.path.join(cfg.out, 'model'))
    sampled_after = sampled_agreement(pipe, base)
    print(f"LoRA run: loss {losses[0]:.3f} -> {losses[-1]:.3f}; argmax agreement with the target {before:.3f} -> "
          f"{after:.3f}; sampled {sampled_before:.3f} -> {sampled_after:.3f} (chance 1/64)")
    assert losses[-1] < losses[0] - 0.5, losses                  # measured 4.07 -> 3.25
    assert before < 0.1 and after > 0.3, (before, after)         # measured 0.02 -> 0.42
    assert sampled_after > 0.25 and sampled_after > 4 * sampled_before, (sampled_before, sampled_after)  # .02 -> .40
    # (b) every base weight bit for bit as it was
    original = Paella.from_pretrained(base['base'] / 'generator', dtype=torch.float32).state_dict()
    kept = lora.base_state(model)
    assert kept.keys() == original.keys()
    changed = [k for k in original if not torch.equal(kept[k], original[k])]
    assert not changed, changed[:5]
    # (c) the adapters alone trained: only lora_ parameters took gradients, and only they are in the optimizer
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    adapters = sorted(n for n, _ in model.named_parameters() if '.lora_' in n)
    assert trainable == adapters and len(adapters) == 2 * len(lora.layers(model)) > 0
    ck = torch.load(os.path.join(cfg.out, 'checkpoints', f'step_{STEPS:07d}.pt'), weights_only=True)
    assert sum(len(g['params']) for g in ck['optimizer']['param_groups']) == len(adapters)
    assert not any(torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if '.lora_B.' in n)


def test_the_saved_adapter_loads_back_to_the_trained_model(base, trained):
    cfg, model = trained
    folder = os.path.join(cfg.out, 'model')
    assert sorted(os.listdir(folder)) == [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS]
    pipe = load(base['base'])
    x = inputs(base)
    plain = logits(pipe.generator, x)
    assert pipe.load_lora(folder) == 'lora0' and pipe.loras == {'lora0': (folder, 1.0)}
    loaded, in_memory = logits(pipe.generator, x), logits(model, x)
    assert not torch.allclose(plain, in_memory, atol=1e-3)                  # the adapter does something
    assert torch.equal(loaded, in_memory), (loaded - in_memory).abs().max()


def test_fused_equals_unfused(base, trained):
    cfg, _ = trained
    pipe = load(base['base'])
    x = inputs(base)
    plain = logits(pipe.generator, x)
    pipe.load_lora(os.path.join(cfg.out, 'model'), 0.5)
    unfused = logits(pipe.generator, x)
    pipe.fuse_lora()
    assert not lora.layers(pipe.generator) and pipe.loras == {}
    assert set(pipe.generator.state_dict()) == set(Paella.from_pretrained(base['base'] / 'generator').state_dict())
    fused = logits(pipe.generator, x)
    assert not torch.allclose(fused, plain, atol=1e-3)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=0)
    pipe.save_pretrained(base['root'] / 'fused')                       # built in: a plain pipeline folder
    torch.testing.assert_close(logits(load(base['root'] / 'fused').generator, x), unfused, atol=1e-5, rtol=0)


def test_no_effect_when_off(base, trained):
    cfg, _ = trained
    folder = os.path.join(cfg.out, 'model')
    seeds = (0, 1, 2)
    reference = [load(base['base']).tokens(CAPTION, seed=s) for s in seeds]
    pipe = load(base['base'])
    state = {k: v.clone() for k, v in pipe.generator.state_dict().items()}
    pipe.load_lora(folder)
    on = [pipe.tokens(CAPTION, seed=s) for s in seeds]
    assert not any(torch.equal(a, b) for a, b in zip(on, reference))
    pipe.unload_lora()
    assert not lora.layers(pipe.generator) and pipe.loras == {}
    after = pipe.generator.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert all(torch.equal(pipe.tokens(CAPTION, seed=s), r) for s, r in zip(seeds, reference))
    pipe.load_lora(folder, 0.0)
    assert lora.layers(pipe.generator)
    assert all(torch.equal(pipe.tokens(CAPTION, seed=s), r) for s, r in zip(seeds, reference))


def test_another_base_or_no_adapter_is_refused(base, trained, tmp_path):
    cfg, _ = trained
    folder = os.path.join(cfg.out, 'model')
    other = load(base['other'])
    x = inputs(base)
    before = logits(other.generator, x)
    with pytest.raises(ValueError, match=re.escape(f"the LoRA adapter {folder} was trained on another generator")):
        other.load_lora(folder)
    assert not lora.layers(other.generator) and other.loras == {}          # nothing half attached
    assert torch.equal(logits(other.generator, x), before)
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'half').mkdir()
    (tmp_path / 'half' / lora.ADAPTER_CONFIG).write_text('{}')
    for bad in ('empty', 'half', 'missing'):
        with pytest.raises(CheckpointError, match='is not a LoRA adapter folder'):
            other.load_lora(tmp_path / bad)
    shutil.copytree(folder, tmp_path / 'damaged')
    (tmp_path / 'damaged' / lora.ADAPTER_WEIGHTS).write_bytes(b'not safetensors')
    with pytest.raises(CheckpointError, match='holds an unreadable adapter'):
        load(base['base']).load_lora(tmp_path / 'damaged')


def cli_errors(capsys):
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err
    return [line for line in err.splitlines() if ': error: ' in line]


def test_cli_lora_flag(base, trained, tmp_path, capsys, monkeypatch):
    from PIL import Image
    from paella.cli import main
    cfg, _ = trained
    folder = os.path.join(cfg.out, 'model')
    # An adapter that is no adapter: one line, exit 2, before any model loads.
    with monkeypatch.context() as m:
        m.setattr(Pipeline, 'from_pretrained', lambda *a, **k: pytest.fail('a model was loaded'))
        capsys.readouterr()
        assert main(['generate', 'x', '--model', str(base['base']), '--lora', str(tmp_path / 'missing_folder')]) == 2
        errors = cli_errors(capsys)
        assert len(errors) == 1 and f'{tmp_path / "missing_folder"} is not a LoRA adapter folder' in errors[0], errors
        assert main(['generate', 'x', '--model', str(base['base']), '--lora', f'{folder}:1e9']) == 2
        errors = cli_errors(capsys)
        assert len(errors) == 1 and 'LoRA scale must be between -100 and 100' in errors[0], errors
    # Onto another base: one line naming the adapter, exit 2.
    assert main(['generate', 'x', '--model', str(base['other']), '--lora', folder, '-o', str(tmp_path / 'no.png')]) == 2
    errors = cli_errors(capsys)
    assert len(errors) == 1 and f'the LoRA adapter {folder} was trained on another generator' in errors[0], errors
    assert not (tmp_path / 'no.png').exists()
    # Onto its base, at the default dtype of the machine (bfloat16 where native): an image.
    assert main(['generate', CAPTION, '--model', str(base['base']), '--lora', f'{folder}:0.5', '--seed', '0',
                 '-o', str(tmp_path / 'yes.png')]) == 0
    assert Image.open(tmp_path / 'yes.png').size == (32, 32)


def finetune_cmd(base, out, steps):
    return [sys.executable, '-m', 'paella.cli', 'finetune', '--base', str(base['base']), '--data', str(base['data']),
            '--out', str(out), '--rank', '4', '--steps', str(steps), '--batch-size', '8', '--lr', '1e-2',
            '--warmup', '5', '--precision', 'fp32', '--ema', '0.9', '--save-every', '5', '--tensorboard', 'false']


def test_killed_lora_run_resumes_exactly(base, tmp_path):
    steps = 40
    full_log = open(tmp_path / 'full.log', 'w')
    full = subprocess.Popen(finetune_cmd(base, tmp_path / 'full', steps), env=ENV, stdout=full_log, stderr=full_log)
    kill_at_checkpoint(finetune_cmd(base, tmp_path / 'killed', steps), ENV, tmp_path / 'killed', 10, steps)
    resumed = subprocess.run(finetune_cmd(base, tmp_path / 'killed', steps), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'resuming from' in resumed.stdout
    full.wait(timeout=120)
    full_log.close()
    assert full.returncode == 0, (tmp_path / 'full.log').read_text()[-2000:]
    for export in ('model', 'ema'):
        a = load_file(str(tmp_path / 'full' / export / lora.ADAPTER_WEIGHTS))
        b = load_file(str(tmp_path / 'killed' / export / lora.ADAPTER_WEIGHTS))
        assert a.keys() == b.keys() and a and all('.lora_' in k for k in a)
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, (export, different[:5])
    model, ema = (load_file(str(tmp_path / 'full' / e / lora.ADAPTER_WEIGHTS)) for e in ('model', 'ema'))
    assert all(ema[k].abs().max() > 0 and not torch.equal(ema[k], model[k]) for k in model if '.lora_B.' in k)
    a = torch.load(tmp_path / 'full' / 'checkpoints' / f'step_{steps:07d}.pt', weights_only=True)
    b = torch.load(tmp_path / 'killed' / 'checkpoints' / f'step_{steps:07d}.pt', weights_only=True)
    assert a['optimizer']['state'][0]['step'] == b['optimizer']['state'][0]['step'] == steps
    start = load_file(str(base['base'] / 'generator' / 'model.safetensors'))
    for ck in (a, b):                                         # the base, in the checkpoints too, untouched
        kept = {k.replace('.base_layer.', '.'): v for k, v in ck['model'].items() if '.lora_' not in k}
        assert kept.keys() == start.keys() and all(torch.equal(v, start[k].float()) for k, v in kept.items())


def test_two_adapters_add_up_in_each_layer(base, trained, tmp_path):
    cfg, _ = trained
    first = os.path.join(cfg.out, 'model')
    second = shutil.copytree(first, tmp_path / 'second')            # same base and layers, other numbers:
    g = torch.Generator().manual_seed(3)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.1
               for k, v in load_file(str(second / lora.ADAPTER_WEIGHTS)).items()}
    save_file(tensors, str(second / lora.ADAPTER_WEIGHTS))
    config = json.loads((second / lora.ADAPTER_CONFIG).read_text())
    assert config['lora_alpha'] == config['r'] == 4
    config['lora_alpha'] = 8                                          # its updates x 2 (alpha / rank)
    (second / lora.ADAPTER_CONFIG).write_text(json.dumps(config))
    # (tensors, scale x alpha / rank) of each: delta W = scale x alpha / rank x B A
    adapters = [(load_file(os.path.join(first, lora.ADAPTER_WEIGHTS)), 0.7), (tensors, -1.3 * 2)]
    pipe = load(base['base'])
    assert [pipe.load_lora(first, 0.7), pipe.load_lora(second, -1.3)] == ['lora0', 'lora1']
    wrapped = {name: m for name, m in pipe.generator.named_modules() if m in set(lora.layers(pipe.generator))}
    assert len(wrapped) == len(adapters[0][0]) // 2 > 0
    for name, layer in wrapped.items():
        assert sorted(layer.active_adapters) == ['lora0', 'lora1'], name
        x = torch.randn(3, layer.get_base_layer().in_features, generator=g)
        with torch.no_grad():
            update = layer(x) - layer.get_base_layer()(x)
        expected = sum(s * x @ (t[f'{name}.lora_B.weight'] @ t[f'{name}.lora_A.weight']).T for t, s in adapters)
        torch.testing.assert_close(update, expected, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match='this pipeline has LoRA adapters on'):
        pipe.save_pretrained(tmp_path / 'saved')
    assert not (tmp_path / 'saved').exists()
    pipe.unload_lora()
    pipe.save_pretrained(tmp_path / 'saved')
    assert load_file(str(tmp_path / 'saved' / 'generator' / 'model.safetensors')).keys() == \
        load_file(str(base['base'] / 'generator' / 'model.safetensors')).keys()


def test_lora_spec(tmp_path):
    import argparse
    from paella.cli.common import lora_spec
    for name in ('ad', 'ad:v2'):                # a folder whose name ends in ':<not a number>' stays a path
        (tmp_path / name).mkdir()
        for file in (lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS):
            (tmp_path / name / file).write_text('')
    ad = str(tmp_path / 'ad')
    assert lora_spec(ad) == (ad, 1.0)
    assert lora_spec(f'{ad}:0.5') == (ad, 0.5)
    assert lora_spec(f'{ad}:-2') == (ad, -2.0)
    assert lora_spec(f'{ad}:v2') == (f'{ad}:v2', 1.0)
    for bad in ('nan', 'inf', '1e9', '-101'):
        with pytest.raises(argparse.ArgumentTypeError, match='LoRA scale must be'):
            lora_spec(f'{ad}:{bad}')
    with pytest.raises(argparse.ArgumentTypeError, match='is not a LoRA adapter folder'):
        lora_spec(str(tmp_path / 'missing'))
    with pytest.raises(argparse.ArgumentTypeError, match='is not a LoRA adapter folder'):
        lora_spec(str(tmp_path / 'missing:0.5'))


def test_resuming_onto_another_base_is_refused(base, tmp_path):
    # the checkpoint holds the first base's weights: going on would train them under the other's name
    train(finetune_config(base, tmp_path / 'run', steps=2))
    with pytest.raises(ValueError, match='adapts another generator'):
        train(finetune_config(base, tmp_path / 'run', steps=3, base=str(base['other'])))


def test_a_dead_response_norm_channel_gives_finite_gradients():
    # sqrt(sum(x^2)) has an infinite gradient at a channel that is 0 everywhere (a tiny LoRA run at lr 2e-2
    # turned NaN at step 18 that way before the clamp)
    from paella.blocks import GlobalResponseNorm
    norm = GlobalResponseNorm(4)
    with torch.no_grad():
        norm.gamma.fill_(1.0)
    x = torch.randn(2, 3, 3, 4)
    x[..., 0] = 0                                           # a channel GELU put at 0 everywhere
    x.requires_grad_()
    norm(x).sum().backward()
    assert torch.isfinite(x.grad).all()
