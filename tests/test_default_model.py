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
    for key in ('top1', 'top5', 'paraphrase_top1', 'paraphrase_top5', 'fid16', 'median_psnr_to_target', 'vqgan_psnr'):
        assert isinstance(report[key], float)
    assert report['vqgan_psnr'] > 15
