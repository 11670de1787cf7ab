"""Low memory (paella.offload, `low_memory=True`): the same computation with one large model in memory at a
time; and the whole v3 demo flow, token for token, against the published demo's steps."""
import gc
import re
import weakref

import pytest
import torch

from paella import offload
from paella.checkpoint import read_state_dict
from paella.conditioning import byt5_encoder
from paella.offload import OnDemand, Weights, using
from paella.pipeline import Pipeline, Settings

FAST = dict(latent_size=(16, 16), steps=4, renoise_steps=3, sampling_conditional_steps=2, prior_steps=3)
PROMPTS = ['a red apple', 'x', '']


def owns_its_memory(t):
    """Not a view into a larger (memory-mapped file's) storage."""
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.parametrize('fmt', ['safetensors', 'bin'])
def test_streamed_byt5_equals_the_whole_encoder_one_block_at_a_time(tmp_path, hf_offline, fmt):
    from hf_tiny import save_t5
    folder = save_t5(tmp_path / fmt, num_layers=3, bin=fmt == 'bin')
    whole, streamed = byt5_encoder(folder), byt5_encoder(folder, stream=True)
    blocks = streamed.model.encoder.block
    held = []                                   # at each block's forward: how many blocks hold real weights
    for block in blocks:
        block.register_forward_pre_hook(lambda m, a: held.append(sum(not b.layer[0].layer_norm.weight.is_meta
                                                                     for b in blocks)))
    a, b = whole.encode(PROMPTS), streamed.encode(PROMPTS)
    assert torch.equal(a.states, b.states) and torch.equal(a.mask, b.mask)
    assert held == [1, 1, 1]                    # only the running block, then it is dropped
    assert all(p.is_meta for p in blocks.parameters())
    # bf16 as transformers loads it, every weight converted as it is read
    ref = byt5_encoder(folder, dtype=torch.bfloat16).encode(PROMPTS).states
    got = byt5_encoder(folder, dtype=torch.bfloat16, stream=True).encode(PROMPTS).states
    assert got.dtype == torch.bfloat16 and torch.equal(ref, got)
    with pytest.raises(ValueError, match='bfloat16 or float32'):
        byt5_encoder(folder, dtype=torch.float16, stream=True)


@pytest.mark.parametrize('fmt', ['safetensors', 'pt'])
def test_weights_are_read_in_chunks_converted_and_copied(tmp_path, monkeypatch, fmt):
    g = torch.Generator().manual_seed(0)
    sd = {f'w{i}': torch.randn(4 + i, 3, generator=g) for i in range(5)} | {'step': torch.tensor(7)}
    path = tmp_path / f'w.{fmt}'
    if fmt == 'pt':
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file
        save_file(sd, path)
    opened = []
    real_load = offload._torch_load if fmt == 'pt' else None
    if real_load:
        monkeypatch.setattr(offload, '_torch_load', lambda f: opened.append(f) or real_load(f))
    monkeypatch.setattr(offload, 'CHUNK_BYTES', 100)      # ~2 tensors a mapping
    for dtype in (None, torch.bfloat16):
        got = Weights([path]).read(list(sd), dtype)
        assert list(got) == list(sd)
        for k, v in sd.items():
            want = v.to(dtype) if dtype and v.is_floating_point() else v
            assert torch.equal(got[k], want) and got[k].dtype == want.dtype and owns_its_memory(got[k])
    if fmt == 'pt':
        assert len(opened) >= 1 + 2 * 3                 # the names once, then a fresh mapping per chunk
    loaded, _ = read_state_dict(path, torch.bfloat16)
    assert loaded['w0'].dtype == torch.bfloat16 and loaded['step'].dtype == torch.int64


def test_on_demand_loads_for_each_use_and_releases():
    loads = []

    def load():
        loads.append(1)
        return torch.nn.Linear(2, 2)
    model = OnDemand(load, config='known without loading')
    assert model.config == 'known without loading' and not loads
    with using(model) as m:
        ref = weakref.ref(m)
        del m
    gc.collect()
    assert ref() is None and len(loads) == 1                          # released after the block
    assert not hasattr(model, 'forward')                              # the model's own: only inside `using`
    kept = OnDemand(load, keep=True)
    with using(kept) as a, using(kept) as b:
        assert a is b and len(loads) == 2
    plain = torch.nn.Linear(2, 2)
    with using(plain) as m:
        assert m is plain


def v3_pipeline(official_files, t5, clip, **kw):
    f = official_files
    return Pipeline.v3(f / 'paella_v3.pt', f / 'vqgan_f4.pt', f / 'prior_v1.pt', byt5=t5, clip=clip, preset='tiny',
                       dtype='fp32', **kw)


def test_low_memory_draws_the_same_tokens(official_files, tiny_t5_dir, tiny_clip_dir, tmp_path, monkeypatch):
    keep = v3_pipeline(official_files, tiny_t5_dir, tiny_clip_dir)
    low = v3_pipeline(official_files, tiny_t5_dir, tiny_clip_dir, low_memory=True, cache=tmp_path / 'cache')
    assert isinstance(low.prior, OnDemand) and low.clip.text.model is None
    a = keep.tokens(['a red apple', 'a fire truck'], seed=0, **FAST)
    b = low.tokens(['a red apple', 'a fire truck'], seed=0, **FAST)
    assert torch.equal(a, b)
    assert low.prior.model is None and low.clip.text.model is None      # nothing kept after the call
    assert low.cache.misses == 2 + 1 + 3                                 # 2 prompts + '' (text), 3 (CLIP)
    # Again: every embedding from the cache, no encoder runs.
    monkeypatch.setattr(low.text_encoder, 'encode', lambda p: pytest.fail('ByT5 ran for a cached prompt'))
    monkeypatch.setattr(low.clip, 'encode_text', lambda p: pytest.fail('CLIP ran for a cached prompt'))
    assert torch.equal(low.tokens(['a red apple', 'a fire truck'], seed=0, **FAST), a)


def test_low_memory_is_the_default_where_memory_is_short(official_files, tiny_t5_dir, tiny_clip_dir, tmp_path,
                                                         monkeypatch):
    folder = v3_pipeline(official_files, tiny_t5_dir, tiny_clip_dir).save_pretrained(tmp_path / 'p')
    monkeypatch.setenv('PAELLA_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(offload, 'available_memory', lambda: 1000)
    short = Pipeline.from_pretrained(folder)
    assert isinstance(short.prior, OnDemand) and short.cache.folder == tmp_path / 'cache'
    monkeypatch.setattr(offload, 'available_memory', lambda: 10 ** 12)
    ample = Pipeline.from_pretrained(folder)
    assert isinstance(ample.prior, torch.nn.Module) and ample.cache is None
    assert Pipeline.from_pretrained(folder, low_memory=True, cache=False).cache is None


def published_demo(prompt, seed, batch, t5_dir, clip_dir, prior, model, s):
    """The published demo's infer() (its app.py) step by step, on the given models: the global RNG seeded
    once; ByT5 states of the prompt and of '' (padding 'longest', max_length 768); CLIP text embeddings;
    the prior's DDPM loop (levels linspace(1, 0, T + 2)[1:], cfg as lerp from zero embeddings); the attention
    weights; then its sample(): two forwards per guided step, softmax -> multinomial, re-noising from the
    initial noise. Token grids (batch, H, W)."""
    from transformers import AutoTokenizer, ByT5Tokenizer, CLIPModel, T5EncoderModel
    t5, t5_tok = T5EncoderModel.from_pretrained(str(t5_dir)).eval(), ByT5Tokenizer()
    clip, clip_tok = CLIPModel.from_pretrained(str(clip_dir)).eval(), AutoTokenizer.from_pretrained(str(clip_dir))
    torch.manual_seed(seed)
    with torch.inference_mode():
        def embed_t5(text):
            ids = t5_tok([text] * batch, padding='longest', return_tensors='pt', max_length=768, truncation=True)
            return t5(input_ids=ids.input_ids).last_hidden_state

        def embed_clip(text):
            out = clip.get_text_features(**clip_tok([text] * batch, padding=True, return_tensors='pt'))
            return out.pooler_output if hasattr(out, 'pooler_output') else out
        t5_uncond, t5_cond = embed_t5(''), embed_t5(prompt)
        clip_cond, clip_uncond = embed_clip(prompt), embed_clip('')

        levels = torch.linspace(1.0, 0.0, s.prior_steps + 2)[1:]
        sc = torch.tensor([0.008])

        def alpha_cumprod(t):
            return (torch.cos((t + sc) / (1 + sc) * torch.pi * 0.5).clamp(0, 1) ** 2
                    / torch.cos(sc / (1 + sc) * torch.pi * 0.5) ** 2).clamp(0.0001, 0.9999)[:, None]
        x = torch.randn(batch, clip_cond.shape[1])
        for i in range(s.prior_steps):
            t, t_prev = levels[i].expand(batch), levels[i + 1].expand(batch)
            noise = torch.lerp(prior(x, t, torch.zeros_like(clip_cond)), prior(x, t, clip_cond), s.prior_cfg)
            a, a_prev = alpha_cumprod(t), alpha_cumprod(t_prev)
            alpha = a / a_prev
            mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * noise / (1 - a).sqrt())
            std = ((1 - alpha) * (1.0 - a_prev) / (1.0 - a)).sqrt() * torch.randn_like(mu)
            x = mu + std * (t_prev != 0).float()[:, None]
        clip_image = x

        attn_weights = torch.ones(t5_cond.shape[1])
        attn_weights[-4:] = s.attn_image_weight
        attn_weights[:-4] = s.attn_text_weight
        shape = (batch, *s.latent_size)
        init_noise = torch.randint(0, model.num_labels, size=shape)
        sampled = init_noise.clone()
        t_list = torch.linspace(1.0, 0.0, s.steps + 1)
        temperatures = torch.linspace(*s.temperature, s.steps)
        cfgs = torch.linspace(s.cfg, s.cfg, s.steps)
        for i, tv in enumerate(t_list[:s.steps]):
            t = torch.ones(batch) * tv
            logits = model(sampled, t, byt5=t5_cond, clip=clip_cond, clip_image=clip_image, attn_weights=attn_weights)
            if i < s.sampling_conditional_steps:
                logits = logits * cfgs[i] + model(sampled, t, byt5=t5_uncond, clip=clip_uncond) * (1 - cfgs[i])
            scores = logits.div(temperatures[i]).softmax(dim=1)
            sampled = torch.multinomial(scores.permute(0, 2, 3, 1).reshape(-1, logits.size(1)), 1)[:, 0]
            sampled = sampled.view(batch, *shape[1:])
            if i < s.renoise_steps:
                sampled = model.add_noise(sampled, torch.ones(batch) * t_list[i + 1], random_x=init_noise)[0]
    return sampled


@pytest.mark.parametrize('low_memory', [False, True])
def test_v3_reproduces_the_published_demo_token_for_token(official_files, tiny_t5_dir, tiny_clip_dir, tmp_path,
                                                          low_memory):
    """Pipeline.v3 at the demo's settings (Settings.v3, float32, the published sampler switches) draws the
    demo flow's tokens, prior included; on a 32x32 grid to keep it quick."""
    pipe = v3_pipeline(official_files, tiny_t5_dir, tiny_clip_dir, low_memory=low_memory, cache=tmp_path / 'c')
    s = Settings.v3()
    assert pipe.settings == s
    latent = dict(latent_size=(32, 32))
    prompt = 'a red apple on a table'
    with using(pipe.prior) as prior:
        want = published_demo(prompt, 42, 2, tiny_t5_dir, tiny_clip_dir, prior, pipe.generator,
                              Settings(**{**s.__dict__, **latent}))
    got = pipe.tokens([prompt] * 2, seed=42, mode='multinomial', batch_cfg=False, cache=False, **latent)
    assert torch.equal(got, want)
    other = pipe.tokens([prompt] * 2, seed=43, mode='multinomial', batch_cfg=False, cache=False, **latent)
    assert (other != want).float().mean() > 0.5        # the seed matters: the match is not a constant


def test_a_smaller_text_encoder_is_a_clear_error(official_files, tiny_clip_dir, tmp_path, hf_offline, capsys):
    """dome272/Paella#23: swapping in a smaller ByT5 crashed deep inside the model; here it is one line."""
    from hf_tiny import save_t5
    from paella.cli import main
    smaller = save_t5(tmp_path / 't5', d_model=16)
    f = official_files
    capsys.readouterr()
    assert main(['convert-v3', str(tmp_path / 'v3'), '--paella', str(f / 'paella_v3.pt'), '--vqgan',
                 str(f / 'vqgan_f4.pt'), '--prior', str(f / 'prior_v1.pt'), '--byt5', str(smaller),
                 '--clip', str(tiny_clip_dir), '--preset', 'tiny']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'text encoder is 16 wide, the generator expects 24' in err[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_low_memory_on_a_gpu(official_files, tiny_t5_dir, tiny_clip_dir, tmp_path):
    """On a GPU the streamed blocks and on-demand models go to the device (sequential offload)."""
    whole = byt5_encoder(tiny_t5_dir, device='cuda').encode(PROMPTS).states
    streamed = byt5_encoder(tiny_t5_dir, device='cuda', stream=True).encode(PROMPTS).states
    assert streamed.is_cuda and torch.allclose(whole, streamed, atol=1e-5)
    low = v3_pipeline(official_files, tiny_t5_dir, tiny_clip_dir, device='cuda', low_memory=True, cache=tmp_path)
    tokens = low.tokens(['a red apple'], seed=0, **FAST)
    assert tokens.is_cuda and tokens.shape == (1, 16, 16) and low.prior.model is None


def test_encoders_named_on_the_hub_count_from_the_local_cache(tiny_t5_dir, tmp_path, monkeypatch):
    """The automatic choice must see ByT5-XL given by name (Pipeline.v3's default), not count it as 0 bytes."""
    import shutil

    import huggingface_hub.constants
    from paella.loading import encoder_files
    snapshot = tmp_path / 'models--org--t5' / 'snapshots' / 'abc123'
    shutil.copytree(tiny_t5_dir, snapshot)
    (tmp_path / 'models--org--t5' / 'refs').mkdir()
    (tmp_path / 'models--org--t5' / 'refs' / 'main').write_text('abc123')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path))
    assert encoder_files({'type': 'byt5', 'path': 'org/t5'}, 'org/not-downloaded') == [snapshot / 'model.safetensors']


def test_damaged_encoders_fail_at_load_and_cache_keys_name_the_dtype(tiny_t5_dir, tiny_clip_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil

    from paella.conditioning import clip_encoder
    damaged = tmp_path / 't5'
    shutil.copytree(tiny_t5_dir, damaged)
    sd = load_file(str(damaged / 'model.safetensors'))
    del sd['encoder.block.1.layer.1.DenseReluDense.wo.weight']
    save_file(sd, str(damaged / 'model.safetensors'))
    with pytest.raises(ValueError, match=re.escape("no 'encoder.block.1.layer.1.DenseReluDense.wo.weight'")):
        byt5_encoder(damaged, stream=True)                  # at load, not at the first prompt
    # bf16 embeddings differ from float32's: never one cache entry for both
    assert byt5_encoder(tiny_t5_dir).id != byt5_encoder(tiny_t5_dir, dtype=torch.bfloat16, stream=True).id
    assert clip_encoder(tiny_clip_dir).id != clip_encoder(tiny_clip_dir, dtype=torch.bfloat16, keep=False).id
