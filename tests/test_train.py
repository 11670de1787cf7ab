"""Training: overfitting really learns, exact resume after SIGKILL, torchrun == one process, bad data."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import synth
from paella import Paella, VQModel, sample
from paella.prior import CosineSchedule, PriorModel
from paella.model import text_pool
from paella.train import RECIPES, train
from conftest import REPO, kill_at_checkpoint

ENV = {**os.environ, 'PYTHONPATH': str(REPO), 'HF_HUB_OFFLINE': '1'}


def config(recipe, tmp_path, **kw):
    base = dict(out=str(tmp_path / 'run'), preset='tiny', precision='fp32', warmup=10,
                log_every=10, save_every=1000, tensorboard=False)
    return RECIPES[recipe].config(**{**base, **kw})


def logged(out):
    return [json.loads(line) for line in open(os.path.join(out, 'metrics.jsonl'))]


def test_generator_overfits_and_generates_the_images_back(tmp_path):
    data = synth.preencoded_tokens(tmp_path / 'd.safetensors', n=4)
    cfg = config('generator', tmp_path, data=str(data), steps=150, batch_size=8, lr=1e-3)
    train(cfg)
    assert logged(cfg.out)[-1]['acc'] > 0.9
    model = Paella.from_pretrained(tmp_path / 'run' / 'model')
    d = load_file(str(data))
    tokens = sample(model, {'byt5': d['text'].float()}, (4, 8, 8), {'byt5': d['_uncond_text'].float().expand(4, -1, -1)},
                    steps=8, cfg=2.0, temperature=(0.5, 0.1), generator=torch.Generator().manual_seed(0))
    agreement = (tokens == d['tokens'].long()).float().mean().item()
    print(f"generator overfit: token accuracy {logged(cfg.out)[-1]['acc']:.3f}, sampled tokens equal {agreement:.3f}")
    assert agreement > 0.9, agreement


def test_pooled_text_alone_carries_the_caption(tmp_path):
    # p_drop_tokens=1: the model never sees a caption's token states, only their pooled vector, so telling
    # the 4 captions apart (and drawing each one's tokens back) is the pooled path's work alone.
    data = synth.preencoded_tokens(tmp_path / 'd.safetensors', n=4)
    cfg = config('generator', tmp_path, data=str(data), steps=150, batch_size=8, lr=1e-3, p_drop_tokens=1.0,
                 model={'pooled_text': True, 'clip_embd': 24})
    train(cfg)
    model = Paella.from_pretrained(tmp_path / 'run' / 'model')
    assert model.config.pooled_text
    d = load_file(str(data))
    empty = d['_uncond_text'].float().expand(4, -1, -1)
    draw = lambda clip: sample(model, {'byt5': empty, 'clip': clip}, (4, 8, 8), {'byt5': empty}, steps=8, cfg=2.0,
                               temperature=(0.5, 0.1), generator=torch.Generator().manual_seed(0))
    agreement = (draw(text_pool(d['text'].float())) == d['tokens'].long()).float().mean().item()
    shuffled = (draw(text_pool(d['text'].float())[[1, 2, 3, 0]]) == d['tokens'].long()).float().mean().item()
    print(f"pooled text alone: sampled tokens equal {agreement:.3f} (captions shuffled: {shuffled:.3f})")
    assert agreement > 0.9 and shuffled < 0.3, (agreement, shuffled)


def psnr(a, b):
    return (10 * torch.log10(1 / ((a - b) ** 2).mean())).item()


def test_vqgan_overfits_to_a_stated_psnr(tmp_path):
    folder = synth.image_folder(tmp_path / 'shapes', 32)
    cfg = config('vqgan', tmp_path, data=str(folder), image_size=32, steps=300, batch_size=8, lr=3e-3)
    train(cfg)
    vq = VQModel.from_pretrained(tmp_path / 'run' / 'model')
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255).permute(2, 0, 1)
                          for p in sorted(folder.glob('*.png'))])
    with torch.no_grad():
        recon = vq.decode_indices(vq.encode_indices(images)).clamp(0, 1)
    print(f"vqgan overfit: reconstruction PSNR {psnr(recon, images):.2f} dB")
    assert psnr(recon, images) >= 19.0                       # measured 21 dB; untrained: ~6 dB
    assert logged(cfg.out)[-1]['used'] > 16                  # dead-code restarts keep codes alive


def prior_loss(model, data, seed=0):
    g = torch.Generator().manual_seed(seed)
    image, text = data['clip_image'], data['clip_text']
    t = 1 - torch.rand(len(image), generator=g)
    noised, noise = CosineSchedule().diffuse(image, t, torch.randn(image.shape, generator=g))
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(noised, t, text), noise).item()


def test_prior_reduces_its_loss_by_a_stated_factor(tmp_path):
    data = synth.preencoded_pairs(tmp_path / 'pairs.safetensors')
    cfg = config('prior', tmp_path, data=str(data), steps=300, batch_size=64, lr=3e-3, ema=0.0)
    torch.manual_seed(cfg.seed)
    untrained = PriorModel(PriorModel.make_config('tiny'))
    train(cfg)
    trained = PriorModel.from_pretrained(tmp_path / 'run' / 'model')
    d = load_file(str(data))
    before, after = prior_loss(untrained, d), prior_loss(trained, d)
    print(f"prior: loss {before:.3f} -> {after:.3f} ({before / after:.1f}x)")
    assert before / after >= 3.0, (before, after)            # measured 7.1x


def train_cmd(out, data, steps, *extra):
    return [sys.executable, '-m', 'paella.cli', 'train', '--data', str(data), '--out', str(out), '--preset', 'tiny',
            '--steps', str(steps), '--batch-size', '8', '--lr', '1e-3', '--warmup', '10', '--precision', 'fp32',
            '--tensorboard', 'false', *extra]


def test_killed_run_resumes_exactly(tmp_path):
    data = synth.preencoded_tokens(tmp_path / 'd.safetensors', n=16)
    steps = 80
    subprocess.run(train_cmd(tmp_path / 'full', data, steps, '--save-every', '5'), env=ENV, check=True,
                   capture_output=True)
    kill_at_checkpoint(train_cmd(tmp_path / 'killed', data, steps, '--save-every', '5'), ENV, tmp_path / 'killed', 10,
                       steps)
    subprocess.run(train_cmd(tmp_path / 'killed', data, steps, '--save-every', '5'), env=ENV, check=True,
                   capture_output=True)
    a = torch.load(tmp_path / 'full' / 'checkpoints' / f'step_{steps:07d}.pt', weights_only=True)
    b = torch.load(tmp_path / 'killed' / 'checkpoints' / f'step_{steps:07d}.pt', weights_only=True)
    for k in a['model']:
        torch.testing.assert_close(b['model'][k], a['model'][k], atol=1e-6, rtol=0)
    assert a['optimizer']['state'][0]['step'] == b['optimizer']['state'][0]['step'] == steps


@pytest.mark.parametrize('strategy', ['ddp', 'fsdp'])
def test_torchrun_two_processes_equal_one_process(tmp_path, strategy):
    """With the presets' dropout (0.1): its masks are drawn per global sample position, not per process."""
    data = synth.preencoded_tokens(tmp_path / 'd.safetensors', n=16)
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                    *train_cmd(tmp_path / 'ddp', data, 4, '--fsdp', str(strategy == 'fsdp'), '--grad-accum', '2',
                               '--log-every', '1')[1:]], env=ENV, check=True, capture_output=True)
    subprocess.run(train_cmd(tmp_path / 'one', data, 4, '--grad-accum', '2', '--log-every', '1'), env=ENV, check=True,
                   capture_output=True)
    a, b = load_file(str(tmp_path / 'one' / 'model' / 'model.safetensors')), \
        load_file(str(tmp_path / 'ddp' / 'model' / 'model.safetensors'))
    init = Paella(Paella.make_config('tiny', byt5_embd=24))
    assert init.config.dropout == 0.1
    assert any((a[k] - v).abs().max() > 1e-4 for k, v in init.state_dict().items())   # it did train
    print(f"{strategy}: max weight difference 1 vs 2 processes {max((a[k] - b[k]).abs().max().item() for k in a):.2e}")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)
    losses = [[r['loss'] for r in logged(tmp_path / run)] for run in ('one', 'ddp')]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)            # all-reduced: the global batch's loss


def bad_folder(tmp_path):
    folder = synth.image_folder(tmp_path / 'bad', 32)
    jpeg = folder / 'red_circle.png'
    buf = (folder / 'truncated.jpg')
    Image.open(jpeg).convert('RGB').save(buf, 'JPEG')
    buf.write_bytes(buf.read_bytes()[:200])
    (folder / 'empty.png').write_bytes(b'')
    (folder / 'text.png').write_text('I am not a picture')
    Image.new('RGB', (1, 1), 'red').save(folder / 'tiny.png')
    Image.open(jpeg).convert('CMYK').save(folder / 'cmyk.jpg', 'JPEG')
    Image.open(jpeg).convert('L').save(folder / 'grey.png')
    Image.open(jpeg).convert('RGBA').save(folder / 'rgba.png')
    Image.open(jpeg).convert('P').save(folder / 'palette.png')
    # A PNG header claiming 20000 x 20000 pixels, with no image data behind it.
    import struct
    import zlib
    ihdr = struct.pack('>IIBBBBB', 20000, 20000, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))
    (folder / 'huge.png').write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IEND', b''))
    (folder / 'latin.txt').write_bytes('caf\xe9'.encode('latin-1'))
    Image.open(jpeg).save(folder / 'latin.png')
    return folder


def test_planted_bad_files_are_skipped_and_reported(tmp_path):
    folder = bad_folder(tmp_path)
    n = len([p for p in folder.iterdir() if p.suffix in ('.png', '.jpg')])
    cfg = config('vqgan', tmp_path, data=str(folder), image_size=32, steps=2, batch_size=n, log_every=1)
    train(cfg)
    log = (tmp_path / 'run' / 'skipped.log').read_text()
    for name, reason in [('truncated.jpg', 'corrupt'), ('empty.png', 'empty file'), ('text.png', 'not an image'),
                         ('tiny.png', 'too small'), ('huge.png', 'too large')]:
        assert f'{name}: {reason}' in log
    for converted in ('cmyk.jpg', 'grey.png', 'rgba.png', 'palette.png'):
        assert converted not in log
    assert 'latin.png: caption not UTF-8' in log
    assert logged(cfg.out)[-1]['skipped'] == 2 * 5           # five bad files, seen in both steps
    assert (tmp_path / 'run' / 'checkpoints' / 'step_0000002.pt').exists()


def test_training_flags_come_from_the_recipe_config(monkeypatch, capsys):
    """One grammar: dashes and spaced values, dotted keys for the model config and the shard filters, the
    old underscore spellings and JSON dicts as aliases; a wrong name or value is a usage error (exit 2)."""
    from paella.cli import main
    from paella.train import GeneratorConfig, VQGANConfig
    seen = []
    monkeypatch.setattr('paella.train.train', seen.append)
    assert main(['train', '--data', 'd', '--steps', '7', '--lr', '1e-4', '--betas', '0.9', '0.95', '--compile',
                 '--tensorboard', 'false', '--model.dropout', '0', '--model.c-hidden', '8', '16', '16',
                 '--filters.min-size', '512']) == 0
    assert seen[-1] == GeneratorConfig(data='d', steps=7, lr=1e-4, betas=(0.9, 0.95), compile=True, tensorboard=False,
                                       model={'dropout': 0.0, 'c_hidden': [8, 16, 16]}, filters={'min_size': 512})
    assert main(['train-vq', '--data=d', '--batch_size=4', '--model_config={"c_hidden": 8}', '--model.levels', '3']) == 0
    assert seen[-1] == VQGANConfig(data='d', batch_size=4, model={'c_hidden': 8, 'levels': 3})
    assert seen[-1].weight_decay == 0.0 and seen[-1].warmup == 100          # the VQGAN recipe's own defaults
    capsys.readouterr()
    for bad, message in ((['--stepz', '3'], 'unrecognized arguments: --stepz'),
                         (['--steps', 'many'], "argument --steps: invalid int value: 'many'"),
                         (['--model.dropout', 'x'], 'invalid float value'),
                         (['--model.nope', '1'], 'unrecognized arguments'),
                         (['--compile', 'maybe'], 'expected true or false')):
        assert main(['train', '--data', 'd', *bad]) == 2
        assert message in capsys.readouterr().err
    assert main(['train-prior', '--help']) == 0
    assert '--p-uncond-prior' in capsys.readouterr().out and len(seen) == 2


def test_webdataset_shards_with_filters(tmp_path):
    from paella.data import webdataset_images
    urls = synth.shards(tmp_path / 'shards')
    stream = iter(webdataset_images(urls, 32, seed=0, shuffle=8, max_watermark=0.5))
    captions = {next(stream)['caption'] for _ in range(40)}
    assert 'a red circle' not in captions and len(captions) == 7   # the watermarked sample is filtered out
    cfg = config('vqgan', tmp_path, data=urls, image_size=32, steps=3, batch_size=4, log_every=1,
                 filters={'max_watermark': 0.5})
    train(cfg)
    assert [r['step'] for r in logged(cfg.out)] == [1, 2, 3]


def test_preencode_then_train_with_samples_and_ema(tmp_path, minilm):
    from paella.data import Preencoded
    from paella.train import preencode
    folder = synth.image_folder(tmp_path / 'shapes', 32)
    (tmp_path / 'vq').mkdir()
    torch.manual_seed(0)
    VQModel(VQModel.make_config('tiny')).save_pretrained(tmp_path / 'vq')
    vq = VQModel.from_pretrained(tmp_path / 'vq')
    n, skipped = preencode(folder, tmp_path / 'pre.safetensors', vq, minilm, image_size=32)
    ds = Preencoded(tmp_path / 'pre.safetensors')
    assert n == 8 and not skipped and len(ds) == 8
    assert ds.tensors['tokens'].shape == (8, 8, 8) and ds.tensors['text'].shape == (8, 24, 384)
    assert ds.meta['captions'][0] == 'a blue circle' and ds.meta['vqgan'] == str((tmp_path / 'vq').resolve())
    with torch.no_grad():
        assert torch.equal(ds.tensors['tokens'][0].long(), vq.encode_indices(
            torch.from_numpy(np.asarray(Image.open(folder / 'blue_circle.png'), dtype=np.float32) / 255)
            .permute(2, 0, 1)[None])[0])
    cfg = config('generator', tmp_path, data=str(tmp_path / 'pre.safetensors'), steps=3, batch_size=4,
                 sample_every=3, ema=0.9, tensorboard=True, log_every=1)
    train(cfg)
    assert list((tmp_path / 'run' / 'tensorboard').glob('events.out.tfevents.*'))
    assert Image.open(tmp_path / 'run' / 'samples' / '0000003.png').size == (4 * 32, 4 * 32)   # 8 samples + 8 targets
    ema = load_file(str(tmp_path / 'run' / 'ema' / 'model.safetensors'))
    model = load_file(str(tmp_path / 'run' / 'model' / 'model.safetensors'))
    assert any(not torch.equal(ema[k], model[k]) for k in model)


def test_generator_on_raw_images_encodes_on_the_fly(tmp_path, minilm):
    folder = synth.image_folder(tmp_path / 'shapes', 32)
    torch.manual_seed(0)
    VQModel(VQModel.make_config('tiny')).save_pretrained(tmp_path / 'vq')
    cfg = config('generator', tmp_path, data=str(folder), vqgan=str(tmp_path / 'vq'), image_size=32, steps=2,
                 batch_size=4, log_every=1, sample_every=2)
    train(cfg)
    assert len(logged(cfg.out)) == 2 and len(list((tmp_path / 'run' / 'text-cache').rglob('*.safetensors'))) == 8
    # samples of the first batch's captions (4) above their real tokens
    assert Image.open(tmp_path / 'run' / 'samples' / '0000002.png').size == (4 * 32, 2 * 32)


@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_mixed_precision_runs(tmp_path, precision):
    data = synth.preencoded_tokens(tmp_path / 'd.safetensors', n=4)
    cfg = config('generator', tmp_path, data=str(data), steps=3, batch_size=4, precision=precision, log_every=1,
                 grad_accum=2)
    train(cfg)
    assert all(np.isfinite(r['loss']) for r in logged(cfg.out))


def test_freeze_trains_only_the_rest(tmp_path):
    folder = synth.image_folder(tmp_path / 'shapes')
    torch.manual_seed(0)
    VQModel(VQModel.make_config('tiny')).save_pretrained(tmp_path / 'vq0')
    frozen = 'in_block,down_blocks,vquantizer'
    cfg = config('vqgan', tmp_path, data=str(folder), image_size=32, steps=3, batch_size=4, init=str(tmp_path / 'vq0'),
                 freeze=frozen, dead_code_every=1)
    before, after = VQModel.from_pretrained(tmp_path / 'vq0').state_dict(), train(cfg).state_dict()
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same == k.startswith(tuple(frozen.split(','))), k
    with pytest.raises(ValueError, match='matches no parameter'):
        train(config('vqgan', tmp_path, data=str(folder), out=str(tmp_path / 'r2'), image_size=32, steps=1,
                     batch_size=4, freeze='encoder'))


def test_init_grows_a_decoder_that_starts_as_the_old_one(tmp_path, capsys):
    from paella.train.state import init_from
    folder = synth.image_folder(tmp_path / 'shapes')
    torch.manual_seed(0)
    old = VQModel(VQModel.make_config('tiny'))
    for p in old.parameters():                        # non-zero gammas, so the old decoder is not the identity
        p.data.add_(torch.randn_like(p) * 0.05)
    old.save_pretrained(tmp_path / 'vq0', {k: v.half() for k, v in old.state_dict().items()})  # as shipped
    old = VQModel.from_pretrained(tmp_path / 'vq0', dtype=torch.float32).eval()
    grown = VQModel(VQModel.make_config('tiny', decoder_blocks=3))
    init_from(grown, tmp_path / 'vq0')
    assert 'new ones start as built' in capsys.readouterr().out
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in old.parameters())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(grown.eval()(x)[0], old(x)[0])
    frozen = 'in_block,down_blocks,vquantizer'
    cfg = config('vqgan', tmp_path, data=str(folder), image_size=32, steps=2, batch_size=4, init=str(tmp_path / 'vq0'),
                 model={'decoder_blocks': 3}, freeze=frozen)
    trained = train(cfg)
    assert trained.config.decoder_blocks == 3
    assert torch.equal(trained.encode_indices(x), old.encode_indices(x))       # the tokens stay the same
    with pytest.raises(ValueError, match='does not fit this model'):
        init_from(VQModel(VQModel.make_config('small')), tmp_path / 'vq0')          # other shapes
    with pytest.raises(ValueError, match='not in the model'):
        init_from(VQModel(VQModel.make_config('tiny', bottleneck_blocks=1)), tmp_path / 'vq0')


def vq_losses(tmp_path, x, **weights):
    """{value: (task, loss on x)} for VQGAN recipes that differ only in one loss weight, from the same
    initial model: ``weights`` is {name: values}."""
    from paella.train.distributed import Slice
    from paella.train.recipes import VQTask
    (name, values), = weights.items()
    folder, out, state = synth.image_folder(tmp_path / 'shapes'), {}, None
    for w in values:
        task = VQTask(config('vqgan', tmp_path, data=str(folder), image_size=32, **{name: w}), torch.device('cpu'))
        state = state or task.model.state_dict()
        task.model.load_state_dict(state)
        out[w] = task, task.loss(task.model, {'image': x}, Slice(range(2), 2, torch.Generator()))[0]
    return out


def test_vq_loss_l1_weight(tmp_path):
    x = torch.rand(2, 3, 32, 32)
    losses = vq_losses(tmp_path, x, l1_weight=(0.0, 1.0))
    recon = losses[1.0][0].model(x)[0]
    assert torch.allclose(losses[1.0][1] - losses[0.0][1], torch.nn.functional.l1_loss(recon, x), atol=1e-6)


def test_commit_weight_weights_the_commitment_alone(tmp_path):
    """The recipe's loss is codebook + commit_weight x commitment: the codebook gets the codebook loss's
    gradient whatever the weight, and at weight 0 the encoder gets no commitment gradient at all."""
    x = torch.rand(2, 3, 32, 32)
    grads = {}
    for w, (task, loss) in vq_losses(tmp_path, x, commit_weight=(0.0, 1.0)).items():
        loss.backward()
        grads[w] = {k: p.grad.clone() for k, p in task.model.named_parameters() if p.grad is not None}
    model = task.model
    model.zero_grad()
    recon, (codebook, commitment), _, _ = model(x, details=True)
    codebook.backward(retain_graph=True)
    expected_codebook = model.vquantizer.codebook.weight.grad.clone()
    model.zero_grad()
    (task.cfg.l1_weight * F.l1_loss(recon, x) + F.mse_loss(recon, x)).backward()    # reconstruction alone
    encoder = [k for k in grads[0.0] if k.startswith(('in_block', 'down_blocks'))]
    for w in (0.0, 1.0):
        torch.testing.assert_close(grads[w]['vquantizer.codebook.weight'], expected_codebook, atol=1e-7, rtol=1e-5)
    for k in encoder:
        torch.testing.assert_close(grads[0.0][k], dict(model.named_parameters())[k].grad, atol=1e-7, rtol=1e-5)
    assert any(not grads[1.0][k].allclose(grads[0.0][k]) for k in encoder)         # weight 1 does pull the encoder


def test_tokens_outside_the_codebook_are_named_before_training(tmp_path):
    """Pre-encoded tokens are checked once when the run starts (the forward no longer reads them back)."""
    data = synth.preencoded_tokens(tmp_path / 'd.safetensors', n=4, codes=128)     # the tiny preset has 64
    with pytest.raises(ValueError, match=r'token ids must lie in \[0, 63\], got values in \[0, 127\]'):
        train(config('generator', tmp_path, data=str(data), steps=2, batch_size=2))
