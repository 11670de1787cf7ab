"""The emoji model shipped inside the package generates offline, right after the install."""
import numpy as np
import pytest
from PIL import Image

from paella.pipeline import Pipeline, default_model_path


@pytest.fixture(scope='module')
def pipe(hf_offline):
    return Pipeline.from_pretrained()


def test_shipped_weights_are_small_and_attributed():
    files = [p for p in default_model_path().rglob('*') if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 60 * 2 ** 20
    assert 'CC BY-SA 4.0' in (default_model_path() / 'ATTRIBUTION.txt').read_text()


def test_default_model_images_are_seeded_and_follow_the_prompt(pipe):
    arrays = lambda images: [np.asarray(im) for im in images]
    a = arrays(pipe(['red apple', 'fire engine'], seed=0))
    b = arrays(pipe(['red apple', 'fire engine'], seed=0))
    c = arrays(pipe(['red apple', 'fire engine'], seed=1))
    assert all(x.shape == (64, 64, 3) for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert np.abs(a[0].astype(int) - a[1].astype(int)).mean() > 10     # different prompts, different images


def test_generate_command_uses_the_default_model(tmp_path, hf_offline):
    from paella.cli import main
    assert main(['generate', 'red apple', '--seed', '0', '-o', str(tmp_path / 'apple.png')]) == 0
    assert Image.open(tmp_path / 'apple.png').size == (64, 64)


def test_eval_command_reports_every_measure(tmp_path, hf_offline, capsys):
    import json
    from paella.cli import main
    from paella.openmoji import build
    build(tmp_path / 'emoji', 64)
    assert main(['eval', '--data', str(tmp_path / 'emoji'), '--n', '12', '--steps', '4']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['emoji'] == 12 and report['paraphrases'] == 12
    for key in ('top1', 'top5', 'paraphrase_top1', 'paraphrase_top5', 'fid16', 'median_psnr_to_target', 'vqgan_psnr',
                'vqgan_psnr_real_set'):
        assert isinstance(report[key], float)
    assert report['vqgan_psnr'] > 15 and report['vqgan_psnr_real_set'] > 15


def test_restored_pairs_then_the_decoder_learns_them(tmp_path, pipe):
    import json
    import synth
    import torch
    from safetensors.torch import load_file
    from paella.data import restored_pairs
    from paella.train import TrainConfig, train
    from paella.vq import VQModel
    from paella.pipeline import default_model_path
    folder = synth.image_folder(tmp_path / 'shapes', 64)
    assert restored_pairs(folder, tmp_path / 'p.safetensors', pipe, strength=0.5, copies=1, batch_size=4) == 16
    assert restored_pairs(folder, tmp_path / 'q.safetensors', pipe, strength=0.5, copies=1, batch_size=4) == 16
    d, again = load_file(str(tmp_path / 'p.safetensors')), load_file(str(tmp_path / 'q.safetensors'))
    assert all(torch.equal(d[k], again[k]) for k in d)                            # seeded
    # Per batch of 4: the images' own tokens, then the same images' tokens restored from noise level 0.5.
    real, restored = d['tokens'].view(2, 2, 4, 16, 16).long().unbind(1)
    assert d['restored'].view(2, 2, 4)[:, 1].all() and not d['restored'].view(2, 2, 4)[:, 0].any()
    files = sorted(folder.glob('*.png'))
    assert torch.equal(real.reshape(8, 16, 16), pipe.encode_images(files))
    assert torch.equal(d['image'].view(2, 2, 4, 3, 64, 64)[:, 0].reshape(8, 3, 64, 64),
                       torch.stack([torch.from_numpy(np.array(Image.open(f).convert('RGB'))).permute(2, 0, 1)
                                    for f in files]))
    agree = (real == restored).float().mean().item()
    assert 0.05 < agree < 0.95, agree           # restored (chance agreement is 1/1024), not copied
    # train-vq on the file: the decoder alone learns to draw these images from these tokens.
    cfg = TrainConfig(model='vqgan', data=str(tmp_path / 'p.safetensors'), out=str(tmp_path / 'run'), steps=30,
                      batch_size=8, lr=1e-3, warmup=1, log_every=1, precision='fp32', tensorboard=False,
                      init=str(default_model_path() / 'vqgan'), model_config='{"decoder_blocks": 8}',
                      freeze='in_block,down_blocks,vquantizer', preset='small')
    before = VQModel.from_pretrained(default_model_path() / 'vqgan', dtype=torch.float32).state_dict()
    after = train(cfg).state_dict()
    assert all(torch.equal(before[k], after[k]) == k.startswith(('in_block', 'down_blocks', 'vquantizer'))
               for k in before)
    psnr = [json.loads(line)['psnr'] for line in open(tmp_path / 'run' / 'metrics.jsonl')]
    print(f"decoder on restored pairs: psnr {np.mean(psnr[:5]):.2f} -> {np.mean(psnr[-5:]):.2f} dB")
    assert np.mean(psnr[-5:]) > np.mean(psnr[:5]) + 2
    with pytest.raises(ValueError, match='--freeze=in_block,down_blocks,vquantizer'):
        train(TrainConfig(model='vqgan', data=str(tmp_path / 'p.safetensors'), out=str(tmp_path / 'r2'), steps=1))
