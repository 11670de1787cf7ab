"""Checkpoint I/O: model folders, official .pt files, safetensors files, and clear errors."""
import json
import pickle
import subprocess
import sys

import pytest
import torch

from paella import CheckpointError, Paella, PaellaConfig, VQModel
from paella.cli import main
from conftest import fixtures_dir


def logits(model, paella_fixture):
    _, inp, _, _ = paella_fixture
    with torch.no_grad():
        return model(inp['x'], inp['r'], inp['byt5'], inp['clip'], inp['clip_image'])


def test_tiny_preset_is_the_fixture_config(paella_fixture):
    assert Paella.make_config('tiny') == PaellaConfig(**paella_fixture[3])


def test_saved_then_loaded_paella_gives_bit_identical_logits(tiny_paella, paella_fixture, tmp_path):
    tiny_paella.save_pretrained(tmp_path / 'm')
    assert sorted(p.name for p in (tmp_path / 'm').iterdir()) == ['config.json', 'model.safetensors']
    meta = json.loads((tmp_path / 'm' / 'config.json').read_text())
    assert meta['model_type'] == 'paella' and meta['config']['c_hidden'] == [32, 64, 64]
    loaded = Paella.from_pretrained(tmp_path / 'm')
    assert loaded.config == tiny_paella.config and not loaded.training
    assert torch.equal(logits(loaded, paella_fixture), logits(tiny_paella, paella_fixture))


def test_saved_then_loaded_vqgan_decodes_bit_identically(tiny_vq, vq_fixture, tmp_path):
    tiny_vq.save_pretrained(tmp_path / 'vq')
    loaded = VQModel.from_pretrained(tmp_path / 'vq')
    idx = vq_fixture[2]['indices']
    with torch.no_grad():
        assert torch.equal(loaded.decode_indices(idx), tiny_vq.decode_indices(idx))
    with pytest.raises(CheckpointError, match="'vqgan' model"):
        Paella.from_pretrained(tmp_path / 'vq')


@pytest.mark.parametrize('wrap', [False, True])
def test_official_pt_file_loads_bare_or_under_state_dict(paella_fixture, tmp_path, wrap):
    sd = paella_fixture[0]
    torch.save({'state_dict': sd, 'iter': 5} if wrap else sd, tmp_path / 'paella.pt')
    model = Paella.from_pretrained(tmp_path / 'paella.pt', preset='tiny')
    torch.testing.assert_close(logits(model, paella_fixture), paella_fixture[2]['logits_full'], atol=1e-5, rtol=0)


def test_safetensors_file_with_config_metadata_loads(tmp_path, tiny_paella, paella_fixture):
    from safetensors.torch import save_file
    save_file(dict(tiny_paella.state_dict()), str(tmp_path / 'w.safetensors'),
              metadata={'config': json.dumps(paella_fixture[3])})
    model = Paella.from_pretrained(tmp_path / 'w.safetensors')
    assert torch.equal(logits(model, paella_fixture), logits(tiny_paella, paella_fixture))


def test_keys_that_do_not_fit_are_listed(paella_fixture, tmp_path):
    sd = dict(paella_fixture[0])
    del sd['clf.1.weight']
    sd['extra.weight'] = torch.zeros(1)
    torch.save(sd, tmp_path / 'bad.pt')
    with pytest.raises(CheckpointError) as e:
        Paella.from_pretrained(tmp_path / 'bad.pt', preset='tiny')
    assert 'missing keys (1): clf.1.weight' in str(e.value)
    assert 'unexpected keys (1): extra.weight' in str(e.value)


def test_wrong_size_is_reported_as_shape_mismatch(paella_fixture, tmp_path):
    torch.save(paella_fixture[0], tmp_path / 'tiny.pt')
    with pytest.raises(CheckpointError, match=r'shape mismatches .*byt5_mapper.weight: checkpoint \(32, 24\)'):
        Paella.from_pretrained(tmp_path / 'tiny.pt')          # default preset v3 is far larger


@pytest.mark.parametrize('name, content', [
    ('notes.pt', b'these are my notes, not weights\n'),
    ('empty.pt', b''),
    ('random.safetensors', bytes(range(256)) * 4),
    ('list.pt', None),
])
def test_files_that_are_not_checkpoints(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        torch.save([torch.zeros(2)], path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=name):
        Paella.from_pretrained(path, preset='tiny')


class Exploit:
    def __reduce__(self):
        return (open, (str(Exploit.target), 'w'))


def test_pickled_code_is_never_run(tmp_path):
    Exploit.target = tmp_path / 'pwned'
    with open(tmp_path / 'evil.pt', 'wb') as f:
        pickle.dump({'state_dict': Exploit()}, f, protocol=2)
    with pytest.raises(CheckpointError, match='it is a pickle, and paella reads weights only'):
        Paella.from_pretrained(tmp_path / 'evil.pt', preset='tiny')
    assert not Exploit.target.exists()


def test_missing_path_and_incomplete_folder(tmp_path):
    with pytest.raises(CheckpointError, match='no such checkpoint'):
        Paella.from_pretrained(tmp_path / 'nope.pt')
    with pytest.raises(CheckpointError, match='config.json'):
        Paella.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown Paella preset 'huge'"):
        Paella.make_config('huge')


def test_cli_convert_then_info(paella_fixture, vq_fixture, tmp_path, capsys):
    torch.save(paella_fixture[0], tmp_path / 'paella.pt')
    torch.save({'state_dict': vq_fixture[0]}, tmp_path / 'vqgan.pt')
    assert main(['convert', str(tmp_path / 'paella.pt'), str(tmp_path / 'p'), '--preset', 'tiny']) == 0
    assert main(['convert', str(tmp_path / 'vqgan.pt'), str(tmp_path / 'v'), '--preset', 'tiny']) == 0
    assert 'wrote paella (412,672 parameters)' in capsys.readouterr().out
    assert main(['info', str(tmp_path / 'p')]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info['model_type'] == 'paella' and info['parameters'] == 412_672
    assert main(['info', str(tmp_path / 'v')]) == 0
    assert json.loads(capsys.readouterr().out)['config']['codebook_size'] == 64
    (tmp_path / 'junk.pt').write_text('junk')
    assert main(['info', str(tmp_path / 'junk.pt')]) == 2
    assert 'error' in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, '-m', 'paella.cli', '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and 'convert' in out.stdout


def test_info_names_what_a_path_is(tmp_path, capsys):
    """A pipeline folder, an empty folder and a missing file each get their own one-line error (exit 2)."""
    (tmp_path / 'pipe').mkdir()
    (tmp_path / 'pipe' / 'pipeline.json').write_text('{}')
    for path, message in ((tmp_path / 'pipe', 'is a pipeline folder: name one of its models'),
                          (tmp_path, 'is a folder without a model'), (tmp_path / 'nope.pt', 'no such checkpoint file')):
        assert main(['info', str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
