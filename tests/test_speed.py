"""Every speed switch keeps the published results: fp32 tokens identical, bf16 agreement stated, the
inverse-CDF step draws from the same distribution; the device defaults and the benchmark script."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, load_fixture, published
from paella import Paella, sample
from paella.sampler import draw_tokens
from paella.speed import FAST_SAMPLING, bf16_supported, compile_model, default_dtype, resolve_dtype

SETTINGS = dict(steps=6, renoise_steps=5, temperature=(1.0, 0.2), cfg=4.0)


@pytest.fixture(scope='module')
def tiny():
    """The fixture's published tiny model, with random text states and zeros as the unconditional input."""
    model = published(Paella, load_fixture('paella_tiny'))
    byt5 = torch.randn(2, 7, model.config.byt5_embd, generator=torch.Generator().manual_seed(0))
    return model, {'byt5': byt5}, {'byt5': torch.zeros_like(byt5)}


def run(model, cond, uncond, seed=0, **kw):
    return sample(model, cond, (2, 16, 16), uncond, generator=torch.Generator().manual_seed(seed),
                  **{**SETTINGS, **kw})


def test_fp32_switches_give_the_published_tokens(tiny):
    model, cond, uncond = tiny
    reference = run(model.set_published_math(True), cond, uncond)
    model.set_published_math(False)
    weights = torch.linspace(0.5, 1.5, 7)
    for kw in (dict(batch_cfg=True), dict(cache=True), dict(batch_cfg=True, cache=True), {}):
        assert torch.equal(run(model, cond, uncond, **kw), reference), kw
    # With attention reweighting (conditional branch only) and with guidance for part of the steps.
    ref_w = run(model, cond, uncond, attn_weights=weights, sampling_conditional_steps=4)
    fast_w = run(model, cond, uncond, attn_weights=weights, sampling_conditional_steps=4, batch_cfg=True, cache=True)
    assert torch.equal(ref_w, fast_w) and not torch.equal(ref_w, reference)


def test_published_math_equals_the_fast_math_in_logits(tiny):
    model, cond, _ = tiny
    x = torch.randint(0, model.num_labels, (2, 16, 16), generator=torch.Generator().manual_seed(1))
    r = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        fast = model.set_published_math(False)(x, r, **cond)
        published = model.set_published_math(True)(x, r, **cond)
        cached = model.set_published_math(False)(x, r, **model.prepare(**cond))
    torch.testing.assert_close(fast, published, atol=1e-5, rtol=0)
    assert torch.equal(fast, cached)
    assert fast.permute(0, 2, 3, 1).is_contiguous()              # channels-last logits for the sampler


def test_unequal_branches_fall_back_to_two_forwards(tiny):
    """A negative prompt of another length cannot share one batch: same tokens as the published loop."""
    model, cond, _ = tiny
    uncond = {'byt5': torch.randn(2, 3, model.config.byt5_embd, generator=torch.Generator().manual_seed(2))}
    assert torch.equal(run(model, cond, uncond, batch_cfg=True, cache=True), run(model, cond, uncond))


def test_cdf_step_draws_the_softmax_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float('-inf')]).view(1, 5, 1, 1).expand(1, 5, 100, 100)
    for temperature in (1.0, 0.5):
        tokens = draw_tokens(logits, temperature, 'cdf', torch.Generator().manual_seed(0))
        freq = torch.bincount(tokens.flatten(), minlength=5).double() / tokens.numel()
        expected = (logits[0, :, 0, 0] / temperature).softmax(0).double()
        assert freq[4] == 0                                         # masked codes are never drawn
        assert (freq - expected).abs().max() < 0.01, (freq, expected)   # 10,000 draws: 4 sigma < 0.01
    a = draw_tokens(logits, 1.0, 'cdf', torch.Generator().manual_seed(3))
    assert torch.equal(a, draw_tokens(logits, 1.0, 'cdf', torch.Generator().manual_seed(3)))


def test_bf16_agrees_with_fp32_on_the_default_model(hf_offline):
    from paella.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(dtype=torch.float32)
    cond, uncond, _ = pipe.conditions(['red apple', 'fire engine'])
    s = pipe.settings
    kw = dict(steps=s.steps, renoise_steps=s.renoise_steps, temperature=s.temperature, cfg=s.cfg,
              mode='multinomial', batch_cfg=True, cache=True)
    fp32 = sample(pipe.generator, cond, (2, 16, 16), uncond, generator=torch.Generator().manual_seed(0), **kw)
    model = pipe.generator.to(torch.bfloat16)
    bf16 = sample(model, {k: v.bfloat16() if v is not None else v for k, v in cond.items()}, (2, 16, 16),
                  {k: v.bfloat16() if v is not None else v for k, v in uncond.items()},
                  generator=torch.Generator().manual_seed(0), **kw)
    agreement = (fp32 == bf16).float().mean().item()
    print(f"bf16 vs fp32 token agreement on the default model: {agreement:.3f}")
    assert agreement > 0.9                                          # measured 0.97-0.99


def test_device_defaults(monkeypatch):
    assert resolve_dtype('auto', 'cpu') == (torch.bfloat16 if bf16_supported('cpu') else torch.float32)
    assert resolve_dtype('fp32', 'cpu') == torch.float32 and resolve_dtype(torch.float16, 'cpu') == torch.float16
    with pytest.raises(ValueError, match='dtype must be'):
        resolve_dtype('fp8', 'cpu')
    # The CUDA path, decided without a GPU: bf16 where the GPU has it, CUDA graphs when compiled.
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: True)
    assert default_dtype('cuda') == torch.bfloat16
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: False)
    assert default_dtype('cuda') == torch.float32
    seen = {}
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: seen.update(kw) or model)
    compile_model(torch.nn.Linear(2, 2), device='cuda')
    assert seen['mode'] == 'reduce-overhead'
    compile_model(torch.nn.Linear(2, 2), device='cpu')
    assert seen['mode'] is None


def test_pipeline_uses_the_fast_defaults(hf_offline):
    from paella.pipeline import Pipeline, Settings
    for s in (Settings(), Settings.v3()):
        assert (s.mode, s.batch_cfg, s.cache) == (FAST_SAMPLING['mode'], True, True)
    pipe = Pipeline.from_pretrained()
    assert next(pipe.generator.parameters()).dtype == default_dtype('cpu')
    assert next(pipe.vqgan.parameters()).dtype == torch.float32


@pytest.mark.slow
def test_compiled_sampling_equals_eager(tiny):
    model, cond, uncond = tiny
    compiled = compile_model(model)
    assert torch.equal(run(compiled, cond, uncond, batch_cfg=True), run(model, cond, uncond, batch_cfg=True))


def test_benchmark_prints_json_lines(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'sample_speed.py'), '--cases', 'default',
                          '--repeats', '1', '--batches', '1'], capture_output=True, text=True, timeout=600,
                         env={**os.environ, 'PYTHONPATH': str(REPO), 'HF_HUB_OFFLINE': '1'})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert rows[0]['case'] == 'matmul_peak' and rows[0]['gflops_bf16'] > 0
    variants = {r['variant']: r for r in rows[1:]}
    assert set(variants) == {'reference', 'exact', 'bf16', 'default'}
    assert variants['exact']['token_agreement'] == 1.0
    for r in rows[1:]:
        assert r['ms_per_image'] > 0 and r['gflop_per_image'] > 0 and 0 < r['peak_fraction'] < 1.5


def test_the_device_is_found_inside_a_cache():
    """On a GPU the sampler must place its noise where the cached conditioning lives."""
    from paella.sampler import _device
    meta = torch.zeros(1, device='meta')
    assert _device({'cache': [(meta, meta)]}, None) == torch.device('meta')
    assert _device({'byt5': None, 'clip': meta}) == torch.device('meta') and _device({}, None) is None
