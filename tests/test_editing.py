"""Editing modes on the shipped emoji model: each is the one sampler with a mask, initial tokens, a start
time or other conditions, so kept tokens stay exact and the ends of each range meet plain generation."""
import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from paella.editing import pixel_to_token_mask, slerp
from paella.pipeline import Pipeline

FAST = dict(steps=3, renoise_steps=2)
S, P = 256, 16          # the shipped model's canvas side and pixels per token (16x16 tokens)
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope='module')
def pipe(hf_offline):
    pipe = Pipeline.from_pretrained()
    assert (pipe.image_size, pipe.pixels_per_token) == ((S, S), P)     # the sizes these tests are written in
    return pipe


@pytest.fixture(scope='module')
def apple(pipe):
    return pipe('red apple', seed=0)[0]


def test_token_mask_any_pixel_and_dilation():
    m = np.zeros((16, 16), dtype=bool)
    m[5, 9] = True                                          # one pixel -> its token (1, 2) with f = 4
    t = pixel_to_token_mask(m, 4)
    assert t.shape == (4, 4) and t.sum() == 1 and t[1, 2]
    d = pixel_to_token_mask(m, 4, dilate=1)
    assert d.sum() == 9 and d[0:3, 1:4].all()


@PROPERTY
@given(seed=st.integers(0, 2 ** 31), size=st.sampled_from([(S, S), (192, 320), (400, 240)]),
       boxes=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0.05, 0.6), st.floats(0.05, 0.6)),
                      min_size=1, max_size=3), dilate=st.integers(0, 1))
def test_inpaint_keeps_unmasked_tokens_exactly(pipe, apple, seed, size, boxes, dilate):
    image = apple.resize(size)
    mask = np.zeros((size[1], size[0]), dtype=bool)
    for x, y, w, h in boxes:
        x0, y0 = int(x * size[0]), int(y * size[1])
        mask[y0:y0 + max(1, int(h * size[1])), x0:x0 + max(1, int(w * size[0]))] = True
    out = pipe.inpaint(image, mask, 'fire engine', dilate=dilate, seed=seed, output='tokens', **FAST)
    original = pipe.encode_images(image)                   # the image at the model's canvas size
    resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(pipe.image_size, Image.BOX)) > 0
    kept = ~pixel_to_token_mask(resized, pipe.pixels_per_token, dilate)
    assert torch.equal(out[0][kept], original[0][kept])


@PROPERTY
@given(seed=st.integers(0, 2 ** 31), canvas=st.tuples(st.sampled_from([S, 384, 512]), st.sampled_from([S, 384, 512])),
       corner=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_outpaint_keeps_the_image_tokens_exactly(pipe, apple, seed, canvas, corner):
    x, y = int(corner[0] * (canvas[0] - S)) // P * P, int(corner[1] * (canvas[1] - S)) // P * P
    out = pipe.outpaint(apple, 'grass', canvas, (x, y), seed=seed, output='tokens', **FAST)
    assert out.shape == (1, canvas[1] // P, canvas[0] // P)
    assert torch.equal(out[0, y // P:y // P + 16, x // P:x // P + 16], pipe.encode_images(apple)[0])


def test_inpaint_and_outpaint_keep_pixels(pipe, apple):
    mask = np.zeros((S, S), dtype=bool)
    mask[:, 160:] = True
    out = np.asarray(pipe.inpaint(apple, mask, 'fire engine', seed=0, **FAST)[0])
    assert np.array_equal(out[:, :160], np.asarray(apple)[:, :160])
    assert not np.array_equal(out[:, 160:], np.asarray(apple)[:, 160:])
    wide = pipe.outpaint(apple, 'grass', (2 * S, S), 'right', seed=0, **FAST)[0]
    assert wide.size == (2 * S, S) and np.array_equal(np.asarray(wide)[:, S:], np.asarray(apple))


def test_outpaint_rounds_the_canvas_up_with_a_notice(pipe, apple):
    with pytest.warns(UserWarning, match='rounded up to 512x256'):     # sides: multiples of 128 px (8 tokens)
        out = pipe.outpaint(apple, 'grass', (400, S), seed=0, output='tokens', **FAST)
    assert out.shape == (1, 16, 32)


@pytest.mark.parametrize('method', ['linear', 'slerp'])
def test_interpolation_ends_are_plain_generation(pipe, method):
    frames = pipe.interpolate('red apple', 'fire engine', n=4, method=method, seed=3, output='tokens')
    assert frames.shape == (4, 16, 16)
    assert torch.equal(frames[0], pipe.tokens('red apple', seed=3)[0])
    assert torch.equal(frames[-1], pipe.tokens('fire engine', seed=3)[0])
    assert not torch.equal(frames[1], frames[0]) and not torch.equal(frames[2], frames[3])


def test_slerp_keeps_norms_and_ends():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    mid = slerp(a, b, 0.5)
    # theta = 90 degrees: sin(45) / sin(90) of each end
    assert torch.allclose(mid, torch.tensor([[0.5 ** 0.5, 2 * 0.5 ** 0.5]]), atol=1e-6)
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    z = torch.zeros(1, 2)
    assert torch.equal(slerp(z, z, 0.3), z)                 # padding states: no division by zero


def test_edit_strength_ends(pipe, apple):
    assert torch.equal(pipe.edit(apple, 'fire engine', 0, output='tokens'), pipe.encode_images(apple))
    assert torch.equal(pipe.edit(apple, 'fire engine', 1, seed=5, output='tokens'),
                       pipe.tokens('fire engine', seed=5))
    half = pipe.edit(apple, 'fire engine', 0.5, seed=5, output='tokens')
    original = pipe.encode_images(apple)
    assert 0 < (half != original).float().mean() < 1


def test_every_mode_repeats_with_its_seed_and_changes_without(pipe, apple):
    mask = np.zeros((S, S), dtype=bool)
    mask[64:192, 64:192] = True
    modes = {
        'variations': lambda seed: pipe.variations(apple, 2, seed=seed, output='tokens', **FAST),
        'inpaint': lambda seed: pipe.inpaint([apple, apple], mask, 'ghost', seed=seed, output='tokens', **FAST),
        'outpaint': lambda seed: pipe.outpaint(apple, 'grass', (384, S), seed=seed, output='tokens', **FAST),
        'interpolate': lambda seed: pipe.interpolate('sun', 'moon', 3, seed=seed, output='tokens', **FAST),
        'edit': lambda seed: pipe.edit(apple, 'green apple', 0.6, seed=seed, output='tokens', **FAST),
        'regional': lambda seed: pipe.regional([('sun', (0, 0, 128, S)), ('moon', (128, 0, S, S))],
                                               num_images=2, seed=seed, output='tokens', **FAST),
    }
    for name, run in modes.items():
        a, b, c = run(1), run(1), run(2)
        assert torch.equal(a, b), name
        assert not torch.equal(a, c), name
    assert modes['variations'](1).shape[0] == 2 and not torch.equal(*modes['variations'](1))


def test_modes_are_functions_of_a_pipeline_and_options(pipe, apple):
    from paella import editing
    o = editing.Options(seed=6, output='tokens', overrides=FAST)
    assert torch.equal(editing.edit(pipe, apple, 'tomato', 0.5, o),
                       pipe.edit(apple, 'tomato', 0.5, seed=6, output='tokens', **FAST))
    # interpolate takes a generator: every frame starts from its state, which the last frame advances
    g = torch.Generator().manual_seed(8)
    a = pipe.interpolate('sun', 'moon', 3, generator=g, output='tokens', **FAST)
    assert torch.equal(a, pipe.interpolate('sun', 'moon', 3, seed=8, output='tokens', **FAST))
    assert not torch.equal(a, pipe.interpolate('sun', 'moon', 3, generator=g, output='tokens', **FAST))


def test_images_in_as_pil_png_jpeg_and_paths(pipe, apple, tmp_path):
    png, jpeg = io.BytesIO(), io.BytesIO()
    apple.save(png, 'PNG')
    apple.save(jpeg, 'JPEG', quality=95)
    apple.save(tmp_path / 'apple.png')
    tokens = pipe.encode_images(apple)
    assert torch.equal(pipe.encode_images(png.getvalue()), tokens)
    assert torch.equal(pipe.encode_images(tmp_path / 'apple.png'), tokens)
    assert pipe.encode_images(jpeg.getvalue()).shape == tokens.shape


def test_negative_prompt_changes_the_unconditional_branch(pipe):
    a = pipe.tokens('red apple', seed=0)
    assert torch.equal(a, pipe.tokens('red apple', negative_prompt='', seed=0))
    assert not torch.equal(a, pipe.tokens('red apple', negative_prompt='green apple', seed=0))
    mask = np.ones((S, S), dtype=bool)
    x = pipe.inpaint(pipe('sun', seed=0)[0], mask, 'red apple', negative_prompt='green apple', seed=0,
                     output='tokens', **FAST)
    y = pipe.inpaint(pipe('sun', seed=0)[0], mask, 'red apple', seed=0, output='tokens', **FAST)
    assert not torch.equal(x, y)


def test_regional_prompts_follow_their_halves(pipe):
    """20 seeded trials on a 512x256 canvas (left / right 256 px halves); measured rate: 20 / 20."""
    from paella_openmoji import REGIONAL_PAIRS, catalogue, regional_trials, render
    wanted = {name for pair in REGIONAL_PAIRS for name in pair}
    real = {name: Image.open(io.BytesIO(render(svg, 64))).convert('RGB')
            for svg, name, *_ in catalogue() if name in wanted}
    rate, wins = regional_trials(pipe, real, trials=20)
    print(f"regional prompts: {sum(wins)} / {len(wins)} trials")
    assert rate >= 0.8


def test_bad_input_is_refused_clearly(pipe, apple, tmp_path):
    (tmp_path / 'notes.txt').write_text('not an image')
    with pytest.raises(ValueError, match='same size'):
        pipe.inpaint(apple, np.ones((128, 128), dtype=bool), 'x')
    with pytest.raises(ValueError, match='not a readable image'):
        pipe.inpaint(apple, tmp_path / 'notes.txt', 'x')
    with pytest.raises(ValueError, match='must be a PIL image, a file path'):
        pipe.inpaint(apple, 3.5, 'x')
    with pytest.raises(ValueError, match='smaller than the image'):
        pipe.outpaint(apple, 'x', (128, S))
    with pytest.raises(ValueError, match='does not fit'):
        pipe.outpaint(apple, 'x', (384, S), (S, 0))
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match='strength must be between 0 and 1'):
            pipe.edit(apple, 'x', strength)
    with pytest.raises(TypeError, match="strength must be a number between 0 and 1, got 'half'"):
        pipe.edit(apple, 'x', 'half')
    with pytest.raises(ValueError, match='n must be'):
        pipe.interpolate('a', 'b', n=1)
    with pytest.raises(ValueError, match='method'):
        pipe.interpolate('a', 'b', method='cubic')
    with pytest.raises(ValueError, match='non-empty list'):
        pipe.regional([])
    with pytest.raises(ValueError, match='inside'):
        pipe.regional([('a', (0, 0, 800, S))])
    with pytest.raises(ValueError, match='does not exist'):
        pipe.edit(tmp_path / 'missing.png', 'x', 0.5)


def test_cli_modes(tmp_path, apple, hf_offline, capsys):
    """Output sizes of the grid-making modes and a refused strength (every mode's README command runs in
    tests/test_readme.py)."""
    from paella.cli import main
    apple.save(tmp_path / 'apple.png')
    runs = {
        'interpolate': ['interpolate', 'sun', 'moon', '-n', '3', '--grid'],
        'regional': ['regional', '--region', 'sun', '0,0,256,256', '--region', 'moon', '256,0,512,256',
                     '--size', '512x256'],
    }
    sizes = {'interpolate': (3 * S, S), 'regional': (2 * S, S)}
    for name, argv in runs.items():
        out = tmp_path / f'{name}.png'
        assert main(argv + ['--seed', '0', '--steps', '3', '-o', str(out)]) == 0, name
        assert Image.open(out).size == sizes[name], name
    assert main(['edit', str(tmp_path / 'apple.png'), 'x', '--strength', '2']) == 2
    assert 'strength must be' in capsys.readouterr().err
