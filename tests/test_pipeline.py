"""The whole v3 text-to-image path, prompt in and image out, on tiny random components of the v3 architecture."""
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from paella.pipeline import Pipeline, Settings, v3_attn_weights

FAST = dict(latent_size=(16, 16), steps=4, renoise_steps=3, sampling_conditional_steps=2, prior_steps=3)


@pytest.fixture
def pipe(official_files, tiny_t5_dir, tiny_clip_dir):
    f = official_files
    return Pipeline.v3(f / 'paella_v3.pt', f / 'vqgan_f4.pt', f / 'prior_v1.pt', byt5=tiny_t5_dir,
                       clip=tiny_clip_dir, preset='tiny')


def test_v3_preset_is_the_published_demo(pipe):
    assert asdict(Settings.v3()) == dict(
        latent_size=(64, 64), steps=32, renoise_steps=26, temperature=(1.2, 0.2), cfg=8.0,
        sampling_conditional_steps=20, sampling_quant_steps=None, mode='cdf', renoise_rule='random', batch_cfg=True,
        cache=True, attn_text_weight=1.2, attn_image_weight=0.4, prior_steps=60, prior_cfg=3.0, prior_sampler='ddpm',
        caption_temperature=None)
    assert pipe.settings == Settings.v3()
    assert v3_attn_weights(7).tolist() == pytest.approx([1.2, 1.2, 1.2, 0.4, 0.4, 0.4, 0.4])


def test_default_settings_are_neutral():
    """No guidance cut-off, no attention reweighting: what a freshly trained model without CLIP wants."""
    s = Settings()
    assert (s.sampling_conditional_steps, s.attn_text_weight, s.attn_image_weight) == (None, None, None)
    assert (s.steps, s.renoise_steps, s.temperature, s.cfg) == (12, None, (1.0, 0.2), 3.0)
    assert (s.prior_steps, s.prior_cfg, s.prior_sampler) == (60, 3.0, 'ddpm')


def test_prompt_in_image_out(pipe):
    images = pipe(['a red apple', 'a fire truck'], seed=0, **FAST)
    assert [im.size for im in images] == [(64, 64), (64, 64)] and images[0].mode == 'RGB'
    again = pipe(['a red apple', 'a fire truck'], seed=0, **FAST)
    other = pipe(['a red apple', 'a fire truck'], seed=1, **FAST)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other[0]))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_conditions_follow_the_published_demo(pipe):
    g = torch.Generator().manual_seed(0)
    cond, uncond, attn = pipe.conditions(['a red apple'], '', replace_settings(pipe, prior_steps=2), g)
    assert cond['byt5'].shape == (1, 12, 24) and uncond['byt5'].shape == (1, 1, 24)   # '' is just </s>
    assert cond['clip'].shape == uncond['clip'].shape == (1, 16) and uncond['clip_image'] is None
    assert cond['clip_image'].shape == (1, 16)                    # from the prior
    assert attn.tolist() == pytest.approx([1.2] * 8 + [0.4] * 4)


def replace_settings(pipe, **kw):
    from dataclasses import replace
    return replace(pipe.settings, **kw)


def test_saved_pipeline_reloads_and_gives_the_same_image(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / 'p')
    loaded = Pipeline.from_pretrained(tmp_path / 'p')
    a = np.asarray(pipe('a red apple', seed=3, **FAST)[0])
    b = np.asarray(loaded('a red apple', seed=3, **FAST)[0])
    assert np.array_equal(a, b)


def test_pipeline_bad_input(pipe):
    with pytest.raises(ValueError, match='give at least one prompt'):
        pipe([], **FAST)
    with pytest.raises(TypeError, match='prompt must be a text, got 3'):
        pipe([3], **FAST)
    with pytest.raises(TypeError, match='stepz'):
        pipe('a', stepz=3)


def test_cli_convert_v3_and_generate(official_files, tiny_t5_dir, tiny_clip_dir, tmp_path, capsys, monkeypatch):
    from PIL import Image
    from paella.cli import main
    f = official_files
    assert main(['convert-v3', str(tmp_path / 'v3'), '--paella', str(f / 'paella_v3.pt'), '--vqgan',
                 str(f / 'vqgan_f4.pt'), '--prior', str(f / 'prior_v1.pt'), '--byt5', str(tiny_t5_dir),
                 '--clip', str(tiny_clip_dir), '--preset', 'tiny']) == 0
    # The official weights as they are: float32 whatever the converting machine prefers to compute in.
    from safetensors import safe_open
    for name in ('generator', 'vqgan', 'prior'):
        with safe_open(str(tmp_path / 'v3' / name / 'model.safetensors'), framework='pt') as weights:
            assert {weights.get_slice(k).get_dtype() for k in weights.keys()} - {'I64'} == {'F32'}, name
    # Make the saved settings fast, as a user would edit pipeline.json.
    import json
    meta = json.loads((tmp_path / 'v3' / 'pipeline.json').read_text())
    meta['settings'].update(FAST)
    (tmp_path / 'v3' / 'pipeline.json').write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(['generate', 'a red apple', 'a fire truck', '--model', str(tmp_path / 'v3'), '--seed', '1',
                 '--num-images', '2', '-o', str(tmp_path / 'out.png'), '--grid']) == 0
    assert Image.open(tmp_path / 'out.png').size == (4 * 64, 64)
    assert main(['generate', 'a red apple', '--model', str(tmp_path / 'v3'), '--seed', '1', '--steps', '2',
                 '-o', str(tmp_path / 'one.png'), '--keep-encoders', '--dtype', 'fp32']) == 0
    assert Image.open(tmp_path / 'one.png').size == (64, 64)
    # Low memory: the same image (float32), the embeddings left in $PAELLA_CACHE.
    monkeypatch.setenv('PAELLA_CACHE', str(tmp_path / 'cache'))
    assert main(['generate', 'a red apple', '--model', str(tmp_path / 'v3'), '--seed', '1', '--steps', '2',
                 '-o', str(tmp_path / 'low.png'), '--low-memory', '--dtype', 'fp32']) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / 'low.png')), np.asarray(Image.open(tmp_path / 'one.png')))
    assert len(list((tmp_path / 'cache').rglob('*.safetensors'))) == 2 + 2      # ByT5 and CLIP: prompt and ''
    assert main(['generate', 'x', '--low-memory', '--keep-encoders']) == 2
    assert main(['generate', 'x', '--model', str(tmp_path / 'nope')]) == 2
    assert 'not a pipeline folder' in capsys.readouterr().err


def test_info_and_convert_take_the_prior(official_files, tmp_path, capsys):
    """prior_v1.pt was refused ('cannot tell which model'): the published prior is one list of blocks."""
    from paella.checkpoint import detect_model_type
    from paella.cli import main
    from conftest import fixtures_dir
    shapes = json.loads((fixtures_dir() / 'prior_v1_state_dict_shapes.json').read_text())['state_dict_shapes']
    assert detect_model_type({k: torch.empty(0) for k in shapes}) == 'prior'       # the official keys
    assert main(['info', str(official_files / 'prior_v1.pt'), '--preset', 'tiny']) == 0
    info = json.loads(capsys.readouterr().out)
    assert info['model_type'] == 'prior' and info['config']['clip_r'] == 16
    assert main(['convert', str(official_files / 'prior_v1.pt'), str(tmp_path / 'p'), '--preset', 'tiny']) == 0
    assert main(['info', str(tmp_path / 'p')]) == 0
    assert json.loads(capsys.readouterr().out.split('\n', 1)[1])['model_type'] == 'prior'


def test_v3_variations_use_the_clip_image_embedding(pipe, monkeypatch):
    from PIL import Image
    red, blue = Image.new('RGB', (64, 64), (220, 30, 30)), Image.new('RGB', (64, 64), (30, 30, 220))
    import paella.pipeline
    seen = []
    original = paella.pipeline.sample
    monkeypatch.setattr(paella.pipeline, 'sample',
                        lambda model, cond, *a, **k: seen.append(cond) or original(model, cond, *a, **k))
    a = pipe.variations(red, n=2, seed=0, output='tokens', **FAST)
    assert torch.equal(a, pipe.variations(red, n=2, seed=0, output='tokens', **FAST))
    assert a.shape == (2, 16, 16) and not torch.equal(a[0], a[1])
    assert torch.equal(seen[0]['clip_image'], pipe.clip.encode_images([red]).expand(2, -1).to(seen[0]['byt5']))
    b = pipe.variations(blue, n=2, seed=0, output='tokens', **FAST)
    assert not torch.equal(seen[-1]['clip_image'], seen[0]['clip_image']) and not torch.equal(a, b)
    # Several images at once (the published demo's list): each embedding is 4 more conditioning tokens.
    both = pipe.variations([red, blue], n=2, seed=0, output='tokens', **FAST)
    assert both.shape == (2, 16, 16) and not torch.equal(both, a)
    listed = seen[-1]['clip_image']
    assert isinstance(listed, list) and [e.shape for e in listed] == [(2, 16), (2, 16)]
    model = pipe.generator
    text, clip = seen[-1]['byt5'], seen[-1]['clip']
    with torch.no_grad():
        seq = model.gen_c_embeddings(text, clip, listed)
        mapped = [model.clip_image_mapper(e).view(2, -1, model.c_cond) for e in listed]
        manual = model.seq_norm(torch.cat([model.byt5_mapper(text), model.clip_mapper(clip).view(2, -1, model.c_cond),
                                           *mapped], dim=1))
    assert seq.shape[1] == text.shape[1] + 4 * 3 and torch.equal(seq, manual)


def test_assemble_rebuilds_the_shipped_pipeline(tmp_path, hf_offline):
    shipped = Pipeline.from_pretrained(dtype=torch.float32)
    shipped.generator.save_pretrained(tmp_path / 'gen')
    shipped.vqgan.save_pretrained(tmp_path / 'vq')
    stored = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(shipped.settings).items()}   # as JSON
    pipe = Pipeline.assemble(tmp_path / 'gen', tmp_path / 'vq', **stored)
    assert pipe.settings == shipped.settings and pipe.specs == shipped.specs
    assert torch.equal(pipe.tokens('red apple', seed=0, steps=3), shipped.tokens('red apple', seed=0, steps=3))
    small = Pipeline.assemble(tmp_path / 'gen', tmp_path / 'vq', image_size=128, steps=4)    # 16 px a token
    assert small.settings == Settings(latent_size=(8, 8), steps=4)
    with pytest.raises(ValueError, match="unknown setting 'stepz'; settings: latent_size, steps"):
        Pipeline.assemble(tmp_path / 'gen', tmp_path / 'vq', stepz=3)


def test_critic_is_offered_only_with_a_head(pipe):
    from paella.serve.limits import BadRequest, Fields, Limits
    assert pipe.renoise_rules == ('random', 'confidence', 'halton')      # the published v3 has no head
    with pytest.raises(ValueError, match="'critic' needs a model with a noise-detection head"):
        pipe('a', renoise_rule='critic', **FAST)
    with pytest.raises(BadRequest, match="renoise must be one of random, confidence, halton, got 'critic'"):
        Fields(Limits(), pipe.renoise_rules).sampling({'renoise': 'critic'})
