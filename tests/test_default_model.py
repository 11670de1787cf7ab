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
    assert all(x.shape == (256, 256, 3) for x in a)         # 16x16 tokens, 16 px each
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert np.abs(a[0].astype(int) - a[1].astype(int)).mean() > 10     # different prompts, different images


def test_generate_command_uses_the_default_model(tmp_path, hf_offline):
    from paella.cli import main
    assert main(['generate', 'red apple', '--seed', '0', '-o', str(tmp_path / 'apple.png')]) == 0
    assert Image.open(tmp_path / 'apple.png').size == (256, 256)


def test_cfg_option_takes_a_number_or_a_schedule(tmp_path, hf_offline, capsys):
    from paella.cli import main
    out = {}
    for cfg in ('2', '2,2', '5,0.5'):
        assert main(['generate', 'red apple', '--seed', '0', '--steps', '4', '--cfg', cfg,
                     '-o', str(tmp_path / f'{cfg}.png')]) == 0
        out[cfg] = np.asarray(Image.open(tmp_path / f'{cfg}.png'))
    assert np.array_equal(out['2'], out['2,2']) and not np.array_equal(out['2'], out['5,0.5'])
    for bad in ('high', '3,2,1'):
        assert main(['generate', 'red apple', '--cfg', bad]) == 2
        assert 'expected a number or START END' in capsys.readouterr().err


def test_eval_command_reports_every_measure(tmp_path, hf_offline, capsys):
    import json
    from paella.cli import main
    from paella_openmoji import PARAPHRASES, build
    build(tmp_path / 'emoji', 64)
    # The report over a 40-emoji set holding every paraphrase target (the whole set's VQGAN reconstruction
    # took 40 s of the test, twice).
    meta = tmp_path / 'emoji' / 'metadata.jsonl'
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    keep = {t for _, t in PARAPHRASES} | {r['text'] for r in rows[:40]}
    meta.write_text(''.join(json.dumps(r) + '\n' for r in rows if r['text'] in keep))
    assert main(['eval', '--data', str(tmp_path / 'emoji'), '--n', '12', '--steps', '4']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['emoji'] == 12 and report['paraphrases'] == 12
    for key in ('top1', 'top5', 'paraphrase_top1', 'paraphrase_top5', 'fid16', 'median_psnr_to_target', 'vqgan_psnr',
                'vqgan_psnr_real_set', 'gap_db'):
        assert isinstance(report[key], float)
    assert report['vqgan_psnr'] > 15 and report['vqgan_psnr_real_set'] > 15
    assert abs(report['gap_db'] - (report['vqgan_psnr'] - report['median_psnr_to_target'])) < 0.011
    # several seeds: a line per seed (the first is the report above: seeded), then mean / min / max
    assert main(['eval', '--data', str(tmp_path / 'emoji'), '--n', '12', '--steps', '4', '--seeds', '2']) == 0
    *lines, summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r.pop('seed') for r in lines] == [0, 1] and lines[0] == report and lines[1] != report
    assert summary['seeds'] == 2
    for key in ('top1', 'fid16', 'gap_db'):
        values = [r[key] for r in lines]
        assert summary[key]['min'] == min(values) and summary[key]['max'] == max(values)
        assert abs(summary[key]['mean'] - sum(values) / 2) < 1e-4


def test_restored_pairs_then_the_decoder_learns_them(tmp_path, pipe):
    import synth
    import torch
    from safetensors.torch import load_file
    from paella.train import restored_pairs
    from paella.train import VQGANConfig, train
    from paella.vq import VQModel
    from paella.pipeline import default_model_path
    folder = synth.image_folder(tmp_path / 'shapes', 256)                # the pipeline's canvas
    assert restored_pairs(folder, tmp_path / 'p.safetensors', pipe, strength=0.5, copies=1, batch_size=4) == (16, [])
    files = sorted(folder.glob('*.png'))
    (folder / 'zz_broken.png').write_bytes(b'not a png')        # skipped and reported; the rest is unchanged
    assert restored_pairs(folder, tmp_path / 'q.safetensors', pipe, strength=0.5, copies=1, batch_size=4) == \
        (16, [('zz_broken.png', 'not an image')])
    d, again = load_file(str(tmp_path / 'p.safetensors')), load_file(str(tmp_path / 'q.safetensors'))
    assert all(torch.equal(d[k], again[k]) for k in d)                            # seeded
    # Per batch of 4: the images' own tokens, then the same images' tokens restored from noise level 0.5.
    real, restored = d['tokens'].view(2, 2, 4, 16, 16).long().unbind(1)
    assert d['restored'].view(2, 2, 4)[:, 1].all() and not d['restored'].view(2, 2, 4)[:, 0].any()
    assert torch.equal(real.reshape(8, 16, 16), pipe.encode_images(files))
    assert torch.equal(d['image'].view(2, 2, 4, 3, 256, 256)[:, 0].reshape(8, 3, 256, 256),
                       torch.stack([torch.from_numpy(np.array(Image.open(f).convert('RGB'))).permute(2, 0, 1)
                                    for f in files]))
    agree = (real == restored).float().mean().item()
    assert 0.05 < agree < 0.95, agree           # restored (chance agreement is 1/1024), not copied
    # train-vq on the file, on 4x4-token crops: the decoder alone learns to draw these images from these tokens.
    shipped = VQModel.from_pretrained(default_model_path() / 'vqgan', dtype=torch.float32)
    cfg = VQGANConfig(data=str(tmp_path / 'p.safetensors'), out=str(tmp_path / 'run'), steps=30,
                      batch_size=8, lr=1e-3, warmup=1, log_every=1, precision='fp32', tensorboard=False,
                      init=str(default_model_path() / 'vqgan'), model=vars(shipped.config), crop=4,
                      freeze='in_block,down_blocks,vquantizer', preset='small')
    trained = train(cfg).eval()
    before, after = shipped.state_dict(), trained.state_dict()
    assert all(torch.equal(before[k], after[k]) == k.startswith(('in_block', 'down_blocks', 'vquantizer'))
               for k in before)

    def psnr(vq):                                  # the whole pictures, from every row's tokens
        with torch.no_grad():
            x = vq.decode_indices(d['tokens'].long()).clamp(0, 1)
        return (10 * torch.log10(1 / ((x - d['image'] / 255) ** 2).mean())).item()
    print(f"decoder on restored pairs: psnr {psnr(shipped):.2f} -> {psnr(trained):.2f} dB")
    assert psnr(trained) > psnr(shipped) + 2
    with pytest.raises(ValueError, match='--freeze in_block,down_blocks,vquantizer'):
        train(VQGANConfig(data=str(tmp_path / 'p.safetensors'), out=str(tmp_path / 'r2'), steps=1))
