"""The sampler's options, seeding and masking, on the published tiny model."""
import pytest
import torch

from paella import sample
from paella.sampler import top_k_filter, typical_filter

SHAPE = (2, 16, 16)


class CountingModel:
    """Wraps a model and records which conditioning each call received."""

    def __init__(self, model):
        self.model, self.num_labels, self.calls = model, model.num_labels, []

    def __call__(self, x, t, **inputs):
        self.calls.append(inputs)
        return self.model(x, t, **inputs)


def run(model, conds, seed=0, **kw):
    cond, uncond = conds
    kw = {'steps': 4, 'cfg': 3.0, **kw}
    return sample(model, cond, kw.pop('shape', SHAPE), uncond, generator=torch.Generator().manual_seed(seed), **kw)


def test_same_seed_same_tokens_other_seed_other_tokens(tiny_paella, conds):
    a, b, c = run(tiny_paella, conds, 1), run(tiny_paella, conds, 1), run(tiny_paella, conds, 2)
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.5


def test_generator_leaves_global_rng_alone(tiny_paella, conds):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    run(tiny_paella, conds, 5)
    assert torch.equal(torch.rand(3), expected)


def test_global_rng_reproduces_without_generator(tiny_paella, conds):
    cond, uncond = conds
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(sample(tiny_paella, cond, SHAPE, uncond, steps=3, cfg=2.0))
    assert torch.equal(*outs)


@pytest.mark.parametrize('mode', ['multinomial', 'argmax', 'quant'])
@pytest.mark.parametrize('renoise_mode', ['start', 'prev', 'rand'])
def test_modes_give_valid_reproducible_tokens(tiny_paella, tiny_vq, conds, mode, renoise_mode):
    kw = dict(mode=mode, renoise_mode=renoise_mode, codebook=tiny_vq.vquantizer.codebook.weight)
    a, b = run(tiny_paella, conds, 3, **kw), run(tiny_paella, conds, 3, **kw)
    assert a.shape == SHAPE and a.dtype == torch.long
    assert 0 <= a.min() and a.max() < tiny_paella.num_labels
    assert torch.equal(a, b)


def test_sampling_quant_steps_switches_to_quant_from_that_step(tiny_paella, tiny_vq, conds):
    """The published demo's switch (`if i >= sampling_quant_steps: mode = "quant"`): the steps before it
    draw with ``mode``, the rest 'quant'; 0 is 'quant' throughout, ``steps`` never switches."""
    codebook = tiny_vq.vquantizer.codebook.weight

    def steps_of(**kw):
        seen = []
        run(tiny_paella, conds, 3, codebook=codebook, callback=lambda i, x: seen.append(x.clone()), **kw)
        return seen
    multinomial, quant = steps_of(), steps_of(mode='quant')
    assert all(map(torch.equal, steps_of(sampling_quant_steps=4), multinomial))
    assert all(map(torch.equal, steps_of(sampling_quant_steps=0), quant))
    mixed = steps_of(sampling_quant_steps=2)
    assert all(map(torch.equal, mixed[:2], multinomial[:2])) and not torch.equal(mixed[2], multinomial[2])
    with pytest.raises(ValueError, match='sampling_quant_steps need the VQGAN codebook'):
        run(tiny_paella, conds, sampling_quant_steps=2)


def test_argmax_without_renoise_is_the_argmax_of_the_last_step(tiny_paella, conds):
    seen = []
    out = run(tiny_paella, conds, 0, mode='argmax', renoise_steps=0, callback=lambda i, x: seen.append(x))
    assert len(seen) == 4 and torch.equal(out, seen[-1])


def test_mask_keeps_every_other_position_exactly(tiny_paella, conds):
    g = torch.Generator().manual_seed(0)
    init_x = torch.randint(0, 64, SHAPE, generator=g)
    for seed in range(4):
        mask = torch.rand(SHAPE, generator=g) < 0.4
        out = run(tiny_paella, conds, seed, init_x=init_x, mask=mask, renoise_mode=['start', 'prev', 'rand'][seed % 3])
        assert torch.equal(out[~mask], init_x[~mask])
        assert (out[mask] != init_x[mask]).any()


def test_cfg_schedule_and_conditional_steps(tiny_paella, conds):
    counting = CountingModel(tiny_paella)
    # A constant schedule is the number.
    assert torch.equal(run(tiny_paella, conds, 4, cfg=(3.0, 3.0)), run(tiny_paella, conds, 4, cfg=3.0))
    run(counting, conds, 0, steps=5, sampling_conditional_steps=2)
    assert len(counting.calls) == 5 + 2
    assert counting.calls[1]['clip'] is None       # the second call of step 0 is the unconditional branch
    counting.calls.clear()
    run(counting, conds, 0, steps=5, cfg=None)
    assert len(counting.calls) == 5
    counting.calls.clear()
    # Without unconditional inputs, guidance uses zeros like the conditional ones (published v3).
    sample(counting, conds[0], SHAPE, steps=1, cfg=2.0)
    assert torch.equal(counting.calls[1]['byt5'], torch.zeros_like(conds[0]['byt5']))


def test_guidance_changes_the_result(tiny_paella, conds):
    assert not torch.equal(run(tiny_paella, conds, 0, cfg=None), run(tiny_paella, conds, 0, cfg=6.0))


def test_attn_weights_reach_only_the_conditional_branch(tiny_paella, conds):
    counting = CountingModel(tiny_paella)
    w = torch.tensor([1.2, 1.2, 1.2, 0.4])
    run(counting, conds, 0, steps=1, attn_weights=w)
    assert counting.calls[0]['attn_weights'] is w and 'attn_weights' not in counting.calls[1]


def test_top_k_filter_keeps_k():
    logits = torch.randn(2, 50, 3, 3, generator=torch.Generator().manual_seed(0))
    kept = top_k_filter(logits, 5).isfinite()
    assert (kept.sum(1) == 5).all()
    assert kept.gather(1, logits.argmax(1, keepdim=True)).all()


def test_typical_filter_keeps_the_requested_mass():
    logits = 3 * torch.randn(2, 50, 3, 3, generator=torch.Generator().manual_seed(0))
    for mass in (0.05, 0.2, 0.9):
        filtered = typical_filter(logits, mass)
        kept = filtered.isfinite()
        assert (kept.sum(1) >= 1).all() and (kept.sum(1) < 50).any()
        assert (logits.softmax(1) * kept).sum(1).min() >= min(mass, 0.05) - 1e-6
    assert (typical_filter(logits, 0.01, min_tokens=4).isfinite().sum(1) >= 4).all()


def test_filters_restrict_sampled_tokens(tiny_paella, conds):
    # Without re-noising, the only draw that differs is the categorical one: top-1 sampling is argmax.
    top1 = run(tiny_paella, conds, 0, top_k=1, renoise_steps=0)
    assert torch.equal(top1, run(tiny_paella, conds, 0, mode='argmax', renoise_steps=0))
    assert not torch.equal(top1, run(tiny_paella, conds, 0, renoise_steps=0))
    assert run(tiny_paella, conds, 0, typical_mass=0.3, typical_min_tokens=2).shape == SHAPE


@pytest.mark.parametrize('kw, message', [
    (dict(steps=0), 'steps'),
    (dict(mode='greedy'), 'mode'),
    (dict(renoise_mode='never'), 'renoise_mode'),
    (dict(mode='quant'), 'codebook'),
    (dict(mask=torch.ones(SHAPE, dtype=torch.bool)), 'init_x'),
    (dict(init_x=torch.zeros(SHAPE, dtype=torch.long), mask=torch.ones(2, 8, 8, dtype=torch.bool)), 'mask'),
    (dict(init_x=torch.zeros(1, 16, 16, dtype=torch.long)), 'init_x'),
    (dict(temperature=0.0), 'temperature'),
    (dict(typical_mass=1.5), 'typical_mass'),
    (dict(top_k=0), 'top_k'),
    (dict(shape=(2, 16)), 'latent_shape'),
])
def test_bad_arguments_are_named(tiny_paella, conds, kw, message):
    with pytest.raises(ValueError, match=message):
        run(tiny_paella, conds, **kw)


def test_renoise_steps_beyond_the_last_step_never_noise_the_result(tiny_paella, conds):
    # a model's renoise_steps (e.g. 11 of its 12 steps) must not re-noise the last of fewer steps; it would
    # show where the last step ends above noise level 0 (t_end > 0, as a partial edit may)
    plain = run(tiny_paella, conds, 4, steps=3, t_end=0.5)
    assert torch.equal(run(tiny_paella, conds, 4, steps=3, t_end=0.5, renoise_steps=11), plain)
    assert not torch.equal(run(tiny_paella, conds, 4, steps=3, t_end=0.5, renoise_steps=1), plain)
