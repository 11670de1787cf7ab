"""The evaluation's measures (paella/evaluate.py), the emoji report (recipes/openmoji/eval.py), and assembling a
pipeline from trained parts."""
import json

import numpy as np
import pytest
import torch
from paella_openmoji import PARAPHRASES, catalogue
from PIL import Image

from paella.evaluate import features, frechet, retrieval
from paella.images import psnr


def test_retrieval_counts_ranks():
    real = torch.eye(6)
    gen = real.clone()
    gen[1] = real[2] * 0.9 + real[1] * 0.1          # nearest to 2, then 1: second place
    top1, top5 = retrieval(gen, real, list(range(6)))
    assert top1 == pytest.approx(5 / 6) and top5 == 1.0


def test_frechet_is_zero_for_identical_sets_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 32, generator=g)
    assert abs(frechet(a, a, dims=16)) < 1e-6
    assert frechet(a, a + 1.0, dims=16) > frechet(a, a + 0.1, dims=16) > 0


def test_features_and_psnr():
    white, red = Image.new('RGB', (64, 64), 'white'), Image.new('RGB', (64, 64), (255, 0, 0))
    f = features([white, red])
    assert f.shape == (2, 768) and f[0].min() == 1.0
    assert psnr(white, white) == pytest.approx(100.0) and psnr(white, red) == pytest.approx(10 * np.log10(3 / 2))


def test_paraphrase_targets_are_emoji_names():
    names = {name for _, name, _, _, _ in catalogue()}
    assert all(target in names for _, target in PARAPHRASES) and len(PARAPHRASES) >= 50
    assert not any(prompt in names for prompt, _ in PARAPHRASES)


def test_assemble_and_generate(tmp_path, minilm, capsys):
    from paella import Paella, VQModel
    from paella.cli import main
    torch.manual_seed(0)
    Paella(Paella.make_config('tiny', byt5_embd=384)).save_pretrained(tmp_path / 'gen')
    VQModel(VQModel.make_config('tiny')).save_pretrained(tmp_path / 'vq')
    assert main(['assemble', str(tmp_path / 'pipe'), '--generator', str(tmp_path / 'gen'), '--vqgan',
                 str(tmp_path / 'vq'), '--image-size', '32', '--settings.steps', '3', '--settings.cfg', '2.5',
                 '--settings.temperature', '0.9', '0.1', '--half']) == 0
    meta = json.loads((tmp_path / 'pipe' / 'pipeline.json').read_text())
    assert meta['settings']['latent_size'] == [8, 8] and meta['settings']['cfg'] == 2.5
    assert meta['text_encoder'] == {'type': 'minilm', 'path': None, 'pad_to': 24}
    from safetensors import safe_open
    with safe_open(str(tmp_path / 'pipe' / 'generator' / 'model.safetensors'), 'pt') as f:
        assert f.get_tensor('byt5_mapper.weight').dtype == torch.float16
    assert main(['generate', 'a red apple', '--model', str(tmp_path / 'pipe'), '--seed', '0',
                 '-o', str(tmp_path / 'a.png')]) == 0
    assert Image.open(tmp_path / 'a.png').size == (32, 32)
    assert main(['assemble', str(tmp_path / 'p2'), '--generator', str(tmp_path / 'gen'), '--vqgan',
                 str(tmp_path / 'vq'), '--settings.stepz', '3']) == 2
    assert 'unrecognized arguments: --settings.stepz' in capsys.readouterr().err


def real_folder(folder, names, size=64):
    """A `paella data openmoji` folder of just these emoji, rendered at ``size`` px."""
    from paella_openmoji import render
    folder.mkdir()
    with open(folder / 'metadata.jsonl', 'w') as meta:
        for svg, name, *_ in catalogue():
            if name in names:
                (folder / f'{svg.stem}.png').write_bytes(render(svg, size))
                meta.write(json.dumps({'file_name': f'{svg.stem}.png', 'text': name}) + '\n')
    return folder


def test_eval_lines_are_the_eval_commands_output(tmp_path, minilm, monkeypatch):
    """`paella eval` as a generator of its lines: the report, several seeds, the regional check, and a
    folder built on the fly (here a small one) and removed afterwards. A tiny random model: the measures'
    values are not the point here (tests/test_default_model.py scores the shipped model)."""
    import paella_openmoji.dataset
    from paella_openmoji import eval_lines

    from paella import Paella, VQModel
    from paella.pipeline import Pipeline, Settings
    torch.manual_seed(0)
    pipe = Pipeline(Paella(Paella.make_config('tiny', byt5_embd=384)), VQModel(VQModel.make_config('tiny')), minilm,
                    settings=Settings(latent_size=(16, 16)))
    names = {'red apple', 'fire engine', 'pizza', 'rocket', 'ghost', 'sun', 'snowman', 'banana'}
    folder = real_folder(tmp_path / 'real', names)
    fast = {'n': 6, 'steps': 2}
    [single] = eval_lines(pipe, folder, **fast)
    report = json.loads(single)
    assert single.startswith('{\n  "emoji": 6,') and report['paraphrases'] >= 4
    *per_seed, summary = [json.loads(line) for line in eval_lines(pipe, folder, seeds=2, **fast)]
    assert [r.pop('seed') for r in per_seed] == [0, 1] and per_seed[0] == report
    assert summary['seeds'] == 2 and summary['top1']['min'] == min(r['top1'] for r in per_seed)
    [regional] = eval_lines(pipe, str(folder), regional=2, steps=2)
    assert json.loads(regional).keys() == {'regional_trials', 'regional_rate'}
    built = []
    monkeypatch.setattr(paella_openmoji.dataset, 'build',
                        lambda out, size: built.append((out, size)) or real_folder(out, names))
    assert list(eval_lines(pipe, None, **fast)) == [single]
    assert built[0][1] == 64 and not built[0][0].exists()
