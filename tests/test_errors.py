"""Bad input gets a clear error naming the problem, never a shape error from deep inside."""
import pytest
import torch

from paella import Paella, VQModel, sample


def call(model, paella_fixture, **override):
    _, inp, _, _ = paella_fixture
    args = dict(x=inp['x'], r=inp['r'], byt5=inp['byt5'], clip=inp['clip'], clip_image=inp['clip_image'])
    args.update(override)
    with torch.no_grad():
        return model(**args)


@pytest.mark.parametrize('init_x, message', [
    (torch.full((2, 16, 16), 64), r'token ids must lie in \[0, 63\], got values in \[64, 64\]'),
    (torch.full((2, 16, 16), -1), r'token ids must lie in \[0, 63\]')])
def test_sample_rejects_token_ids_outside_the_codebook(tiny_paella, paella_fixture, init_x, message):
    """Checked once per `sample` call: the forward itself never reads token values back (see below)."""
    _, inp, _, _ = paella_fixture
    with pytest.raises(ValueError, match=message):
        sample(tiny_paella, {'byt5': inp['byt5']}, init_x=init_x, steps=2)


@pytest.mark.parametrize('override, message', [
    ({'cfg': float('nan')}, 'cfg must be finite'), ({'cfg': (3.0, float('inf'))}, 'cfg must be finite'),
    ({'cfg': (3,)}, r'cfg must be a number or a \(start, end\) pair'), ({'cfg': True}, 'cfg must be a number'),
    ({'temperature': float('nan')}, 'temperature must be finite'),
    ({'temperature': (1.0, 0.5, 0.2)}, 'temperature must be a number or a')])
def test_sample_refuses_guidance_and_temperature_it_cannot_use(tiny_paella, paella_fixture, override, message):
    """nan / inf drew a pale grid without a word; a one-item schedule failed with Python's unpacking error."""
    _, inp, _, _ = paella_fixture
    uncond = {'byt5': torch.zeros_like(inp['byt5'])}
    with pytest.raises(ValueError, match=message):
        sample(tiny_paella, {'byt5': inp['byt5']}, (2, 16, 16), uncond, steps=2, **override)


def test_cfg_flag_refuses_non_finite_values_before_loading(monkeypatch, capsys):
    from paella.cli import main
    monkeypatch.setattr('paella.pipeline.Pipeline.from_pretrained', lambda *a, **k: pytest.fail('model loaded'))
    for bad, said in (('nan', 'got nan'), ('inf', 'got inf'), ('3,-inf', 'got -inf'), ('3 1 2', 'START END')):
        assert main(['generate', 'red apple', '--cfg', *bad.split()]) == 2
        assert said in capsys.readouterr().err


def test_forward_reads_nothing_back_to_the_host(tiny_paella, paella_fixture, monkeypatch):
    """On a GPU every read-back stops the host until the device catches up; the per-step forward (with the
    conditioning cache or without) must not do one."""
    _, inp, _, _ = paella_fixture
    cache = tiny_paella.prepare(inp['byt5'], inp['clip'], inp['clip_image'])

    def read_back(*args, **kwargs):
        raise AssertionError('a tensor was read back to the host inside forward')
    for name in ('item', 'tolist', '__int__', '__float__', '__bool__', '__index__'):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    with torch.no_grad():
        tiny_paella(inp['x'], inp['r'], inp['byt5'], inp['clip'], inp['clip_image'])
        tiny_paella(inp['x'], inp['r'], **cache)


@pytest.mark.parametrize('override, message', [
    (dict(x=torch.zeros(2, 16, 16)), 'integer tensor'),
    (dict(x=torch.zeros(2, 256, dtype=torch.long)), r'shape \(B, H, W\)'),
    (dict(x=torch.zeros(2, 12, 16, dtype=torch.long)), 'not divisible by the U-Net\'s total downsampling 8'),
    (dict(byt5=torch.zeros(2, 7, 25)), r'text conditioning must have shape \(2, L, 24\), got \(2, 7, 25\)'),
    (dict(byt5=torch.zeros(3, 7, 24)), r'text conditioning must have shape \(2, L, 24\)'),
    (dict(clip=torch.zeros(2, 17)), r'clip embedding must have shape \(2, 16\)'),
    (dict(clip_image=torch.zeros(2, 16, 1)), r'clip_image embedding must have shape \(2, 16\)'),
    (dict(r=torch.zeros(3)), r'noise level r must have shape \(2,\)'),
])
def test_paella_rejects_bad_input(tiny_paella, paella_fixture, override, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_paella, paella_fixture, **override)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match='blocks has 2 entries but c_hidden has 3'):
        Paella(Paella.make_config('tiny', blocks=[1, 1]))
    with pytest.raises(ValueError, match="block type 'X'"):
        Paella(Paella.make_config('tiny', level_config=['CT', 'CX', 'CTA']))
    with pytest.raises(TypeError, match='not_an_argument'):
        Paella(not_an_argument=1)
    with pytest.raises(ValueError, match=r'clip_embd \(16\) must equal byt5_embd \(24\)'):
        Paella(Paella.make_config('tiny', pooled_text=True))


@pytest.mark.parametrize('images, message', [
    (torch.zeros(1, 4, 32, 32), r'\(B, 3, H, W\)'),
    (torch.zeros(1, 3, 30, 32), 'not divisible by the VQGAN\'s factor 4'),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), 'float tensor'),
])
def test_vqgan_rejects_bad_images(tiny_vq, images, message):
    with pytest.raises(ValueError, match=message):
        tiny_vq.encode(images)


def test_vqgan_rejects_bad_token_ids(tiny_vq):
    with pytest.raises(ValueError, match=r'token ids must lie in \[0, 63\]'):
        tiny_vq.decode_indices(torch.full((1, 8, 8), 64))
    with pytest.raises(ValueError, match='integer tensor'):
        tiny_vq.decode_indices(torch.zeros(1, 8, 8))
