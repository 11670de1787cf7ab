import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def fixtures_dir():
    """The published-code test vectors: tests/fixtures (a copy of the vectors the published code produced;
    its README says how), or $PAELLA_FIXTURES to test against another set."""
    d = Path(os.environ.get('PAELLA_FIXTURES') or REPO / 'tests' / 'fixtures')
    if not (d / 'paella_tiny.safetensors').is_file():
        pytest.fail(f"reference fixtures not found in {d}: set PAELLA_FIXTURES to the folder "
                    f"holding paella_tiny.safetensors")
    return d


def load_fixture(name):
    """(state_dict, inputs, expected, config) from a fixture file."""
    from safetensors import safe_open
    with safe_open(str(fixtures_dir() / f'{name}.safetensors'), framework='pt') as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(f.metadata()['config'])
    group = lambda p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
    return group('state_dict.'), group('inputs.'), group('expected.'), config


def published(cls, fixture):
    """The published tiny model of a fixture, with its perturbed weights loaded strictly, in eval mode."""
    sd, _, _, config = fixture
    model = cls(**config)
    model.load_state_dict(sd, strict=True)
    return model.eval()


@pytest.fixture(scope='session')
def paella_fixture():
    return load_fixture('paella_tiny')


@pytest.fixture(scope='session')
def vq_fixture():
    return load_fixture('vqgan_f4_tiny')


@pytest.fixture(scope='session')
def prior_fixture():
    return load_fixture('prior_tiny')


@pytest.fixture
def tiny_paella(paella_fixture):
    from paella import Paella
    return published(Paella, paella_fixture)


@pytest.fixture
def tiny_vq(vq_fixture):
    from paella import VQModel
    return published(VQModel, vq_fixture)


@pytest.fixture
def prior(prior_fixture):
    from paella.prior import PriorModel
    return published(PriorModel, prior_fixture)


@pytest.fixture
def conds(paella_fixture):
    """Conditional / unconditional inputs of the fixture's sampler call."""
    _, inp, _, _ = paella_fixture
    return ({'byt5': inp['byt5'], 'clip': inp['clip'], 'clip_image': None},
            {'byt5': inp['sample_uncond_byt5'], 'clip': None, 'clip_image': None})


@pytest.fixture(scope='session')
def official_files(tmp_path_factory):
    """The fixtures' published tiny models saved like the official .pt files (bare state dicts)."""
    folder = tmp_path_factory.mktemp('official')
    for name, file in [('paella_tiny', 'paella_v3.pt'), ('vqgan_f4_tiny', 'vqgan_f4.pt'), ('prior_tiny', 'prior_v1.pt')]:
        torch.save(load_fixture(name)[0], folder / file)
    return folder


@pytest.fixture(scope='session')
def hf_offline():
    """Tests that touch transformers must never reach the network."""
    old = os.environ.get('HF_HUB_OFFLINE')
    os.environ['HF_HUB_OFFLINE'] = '1'
    yield
    if old is None:
        os.environ.pop('HF_HUB_OFFLINE')
    else:
        os.environ['HF_HUB_OFFLINE'] = old


@pytest.fixture(scope='session')
def tiny_t5_dir(tmp_path_factory, hf_offline):
    from hf_tiny import save_t5
    return save_t5(tmp_path_factory.mktemp('t5'))


@pytest.fixture(scope='session')
def tiny_clip_dir(tmp_path_factory, hf_offline):
    from hf_tiny import save_clip
    return save_clip(tmp_path_factory.mktemp('clip'))


@pytest.fixture(scope='session')
def minilm(hf_offline):
    from paella.conditioning import minilm_encoder
    return minilm_encoder()


def kill_at_checkpoint(cmd, env, out, step, last):
    """Start a training command and SIGKILL it once its checkpoint of ``step`` exists (no chance to clean
    up), before its ``last`` step's: a crash in the middle of a run."""
    import subprocess
    import time
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = Path(out) / 'checkpoints' / f'step_{step:07d}.pt'
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9
    done = sorted(p.name for p in (Path(out) / 'checkpoints').glob('*.pt'))
    assert f'step_{last:07d}.pt' not in done, done           # really interrupted
