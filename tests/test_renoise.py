"""The re-noising rules (`paella.renoise`): which positions each rule re-noises at each step, exactly, on
small grids with hand-computed expectations; the published rule's tokens; seeding; the rule's name checked
everywhere a person can type it."""
import pytest
import torch

from paella import checks, sample
from paella.renoise import RULES, confidence_rule, critic_rule, halton_order, halton_rule, lowest, random_rule
from paella.sampler import RENOISE_RULES
from paella.settings import Settings

C = 1000              # codebook of the stand-in model: init noise rarely equals the drawn token
DRAWN = C - 1         # the token every step draws (argmax)
T_NEXT = (0.75, 0.5, 0.25)     # 4 steps: linspace(1, 0, 5)'s next levels; on 4x4: 12, 8, 4 re-noised

# The 2-D Halton sequence over a 4x4 grid, by hand: point i is (floor(4 phi_2(i)), floor(4 phi_3(i))), phi_b
# the base-b radical inverse (phi_2: 1/2, 1/4, 3/4, 1/8, 5/8, 3/8, 7/8, 1/16, 9/16, 5/16, ...; phi_3: 1/3,
# 2/3, 1/9, 4/9, 7/9, 2/9, 5/9, 8/9, 1/27, 10/27, ...). Points 1-10 fall in new cells: (2,1) (1,2) (3,0) (0,1)
# (2,3) (1,0) (3,2) (0,3) (2,0) (1,1); point 11 (13/16, 19/27) -> (3,2) and 13 (11/16, 13/27) -> (2,1) are
# skipped (visited); 12 (3/16, 4/27) -> (0,0); 14 (7/16, 22/27) -> (1,3); 15 (15/16, 7/27) -> (3,1);
# 16 (1/32, 16/27) -> (0,2); 17-22 skipped; 23 (29/32, 25/27) -> (3,3); 24 skipped; 25 (19/32, 17/27) -> (2,2).
HALTON_4x4 = [(2, 1), (1, 2), (3, 0), (0, 1), (2, 3), (1, 0), (3, 2), (0, 3),
              (2, 0), (1, 1), (0, 0), (1, 3), (3, 1), (0, 2), (3, 3), (2, 2)]
# Crafted confidences: position (r, c) draws DRAWN with logit SCORES[r][c] against 0 for the other 999 codes,
# so the lower the score, the less probable the drawn token. The lowest 4: (0,3)=1 (2,0)=2 (0,1)=3 (3,2)=4;
# then (1,3)=5 (2,2)=6 (1,2)=7 (3,0)=8; then (0,2)=9 (2,1)=10 (3,3)=11 (1,0)=12.
SCORES = [[16, 3, 9, 1], [12, 14, 7, 5], [2, 10, 6, 15], [8, 13, 4, 11]]
CONFIDENCE_LOWEST = [(0, 3), (2, 0), (0, 1), (3, 2), (1, 3), (2, 2), (1, 2), (3, 0),
                     (0, 2), (2, 1), (3, 3), (1, 0), (3, 1), (1, 1), (2, 3), (0, 0)]


def grid(positions, shape=(4, 4)):
    m = torch.zeros(shape, dtype=torch.bool)
    for r, c in positions:
        m[r, c] = True
    return m


class Fixed:
    """A stand-in generator: the same logits (1, K, H, W) whatever its input; records each step's input.
    Its noise-detection head rates -SCORES (the least probable drawn token the most likely noise) and
    records what it was asked: (tokens, t)."""

    def __init__(self, logits):
        self.logits, self.num_labels, self.inputs, self.asked = logits, logits.shape[1], [], []
        self.critic = True

    def __call__(self, x, t, critic=False, **inputs):
        if critic:
            self.asked.append((x.clone(), t.clone()))
            return self.logits.expand(len(x), -1, -1, -1), -torch.tensor(SCORES, dtype=torch.float32).expand(len(x), -1, -1)
        self.inputs.append(x.clone())
        return self.logits.expand(len(x), -1, -1, -1)


def crafted():
    """(1, C, 4, 4): DRAWN at logit SCORES against 0 for every other code."""
    logits = torch.zeros(1, C, 4, 4)
    logits[0, DRAWN] = torch.tensor(SCORES, dtype=torch.float32)
    return logits


def expected_masks(rule):
    """The positions ``rule`` re-noises after each of the 4 steps on 4x4, by hand (random: None)."""
    if rule == 'halton':            # keeps the first 4, 8, 12 of the order
        return [~grid(HALTON_4x4[:k]) for k in (4, 8, 12)]
    if rule in ('confidence', 'critic'):     # re-noises the 12, 8, 4 least probable / most likely noise
        return [grid(CONFIDENCE_LOWEST[:k]) for k in (12, 8, 4)]
    return None


def replay(rule, renoise_mode, seed, shape=(2, 4, 4)):
    """Each step's input tokens as the published loop makes them, with the generator's draws in its order:
    the initial noise; per step the rule's draws (random: rand <= t_next), then fresh tokens ('rand')."""
    g = torch.Generator().manual_seed(seed)
    x = init = torch.randint(0, C, shape, generator=g)
    inputs, masks = [x], expected_masks(rule)
    for i, t in enumerate(T_NEXT):
        mask = torch.rand(shape, generator=g) <= t if masks is None else masks[i].expand(shape)
        new = {'start': init, 'prev': x}.get(renoise_mode)
        new = torch.randint(0, C, shape, generator=g) if new is None else new
        x = torch.where(mask, new, torch.full(shape, DRAWN))
        inputs.append(x)
    return inputs


def run_fixed(rule, renoise_mode='start', seed=0, shape=(2, 4, 4), **kw):
    model = Fixed(crafted())
    out = sample(model, {}, shape, cfg=None, steps=4, mode='argmax', renoise_rule=rule, renoise_mode=renoise_mode,
                 generator=torch.Generator().manual_seed(seed), **kw)
    return model.inputs, out


def test_halton_order_of_a_4x4_grid_by_hand():
    ranks = halton_order(4, 4)
    assert [divmod(int(p), 4) for p in ranks.flatten().argsort()] == HALTON_4x4
    assert sorted(halton_order(3, 5).flatten().tolist()) == list(range(15))     # any grid: each cell once
    # 2x3: (floor(2 phi_2), floor(3 phi_3)) = (1,1) (0,2) (1,0) (0,1) (1,2) (0,0) for points 1-6
    assert halton_order(2, 3).tolist() == [[5, 3, 1], [2, 0, 4]]


@pytest.mark.parametrize('rule', ['halton', 'confidence', 'critic'])
@pytest.mark.parametrize('renoise_mode', ['start', 'prev', 'rand'])
def test_each_rule_renoises_exactly_the_expected_positions(rule, renoise_mode):
    """Through `sample`: each step's input is the drawn token where kept and renoise_mode's token where the
    rule said re-noise (the hand-computed masks), for every renoise_mode."""
    inputs, out = run_fixed(rule, renoise_mode, seed=3)
    expected = replay(rule, renoise_mode, seed=3)
    assert (expected[0] != DRAWN).all()                      # the seed's noise never looks like a kept token
    assert len(inputs) == 4 and all(map(torch.equal, inputs, expected))
    assert (out == DRAWN).all()                              # the last step is not re-noised


@pytest.mark.parametrize('renoise_mode', ['start', 'prev', 'rand'])
def test_random_rule_draws_as_the_published_loop(renoise_mode):
    inputs, _ = run_fixed('random', renoise_mode, seed=5)
    assert all(map(torch.equal, inputs, replay('random', renoise_mode, seed=5)))


def test_critic_asks_the_head_about_the_drawn_grid_at_the_next_level():
    model = Fixed(crafted())
    sample(model, {}, (2, 4, 4), cfg=None, steps=4, mode='argmax', renoise_rule='critic',
           generator=torch.Generator().manual_seed(0))
    assert len(model.asked) == 3                               # after every step but the last
    assert all((x == DRAWN).all() for x, _ in model.asked)     # the drawn grid, before re-noising
    assert [t.tolist() for _, t in model.asked] == [[t, t] for t in T_NEXT]
    other = Fixed(crafted())
    sample(other, {}, (2, 4, 4), cfg=None, steps=4, mode='argmax', renoise_rule='confidence')
    assert other.asked == []


def test_halton_keeps_what_it_kept():
    masks = expected_masks('halton')
    kept = [~m for m in masks]
    assert all((a <= b).all() for a, b in zip(kept, kept[1:]))              # the hand expectation grows ...
    inputs, _ = run_fixed('halton', seed=1)
    drawn = [(x == DRAWN) for x in inputs[1:]]                             # ... and so does the sampler's
    assert all((a <= b).all() for a, b in zip(drawn, drawn[1:]))
    assert [int(d[0].sum()) for d in drawn] == [4, 8, 12]


def test_rules_on_one_step_by_hand():
    """The rule functions alone: per-image t_next (4 and 8 of 16 re-noised), ties in raster order."""
    t = torch.tensor([0.25, 0.5])
    tokens = torch.full((2, 4, 4), DRAWN)
    logits = crafted().expand(2, -1, -1, -1)
    chosen = confidence_rule(logits, tokens, t, None)
    assert torch.equal(chosen[0], grid(CONFIDENCE_LOWEST[:4])) and torch.equal(chosen[1], grid(CONFIDENCE_LOWEST[:8]))
    chosen = halton_rule(logits, tokens, t, None)
    assert torch.equal(chosen[0], ~grid(HALTON_4x4[:12])) and torch.equal(chosen[1], ~grid(HALTON_4x4[:8]))
    noise = -torch.tensor(SCORES, dtype=torch.float32).expand(2, -1, -1)    # the head: high = noise
    chosen = critic_rule(None, tokens, t, None, noise_logits=noise)
    assert torch.equal(chosen[0], grid(CONFIDENCE_LOWEST[:4])) and torch.equal(chosen[1], grid(CONFIDENCE_LOWEST[:8]))
    ties = lowest(torch.zeros(1, 4, 4), torch.tensor([0.25]))
    assert torch.equal(ties[0], grid([(0, 0), (0, 1), (0, 2), (0, 3)]))
    assert int(lowest(torch.zeros(1, 4, 4), torch.tensor([0.3]))[0].sum()) == 5      # round(4.8), not floor
    assert int(lowest(torch.zeros(1, 3, 3), torch.tensor([0.5]))[0].sum()) == 4      # round(4.5): half to even
    g, h = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    u = torch.rand(2, 4, 4, generator=h)
    assert torch.equal(random_rule(logits, tokens, t, g), u <= t[:, None, None])


def test_counted_rules_count_only_the_generated_positions():
    """With a mask (inpainting: the left two columns generated), re-noise round(t_next * 8) of those 8 and
    never a kept one, even where a kept position scores lower."""
    where = torch.zeros(1, 4, 4, dtype=torch.bool)
    where[..., :2] = True
    halton = halton_rule(None, torch.zeros(1, 4, 4, dtype=torch.long), torch.tensor([0.5]), None, where=where)
    # the order restricted to columns 0-1: (2,1) (3,0) (0,1) (1,0) (2,0) (1,1) (0,0) (3,1); half are kept
    assert torch.equal(halton[0], grid([(2, 0), (1, 1), (0, 0), (3, 1)]))
    scores = torch.tensor(SCORES, dtype=torch.float32)[None]
    # among columns 0-1 the lowest scores are (2,0)=2 (0,1)=3 (3,0)=8 (2,1)=10; (0,3)=1 is not generated
    assert torch.equal(lowest(scores, torch.tensor([0.5]), where)[0], grid([(2, 0), (0, 1), (3, 0), (2, 1)]))


def test_counted_rules_keep_the_unmasked_positions_in_sample():
    init_x = torch.randint(0, C, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[..., :2] = True
    for rule in ('halton', 'confidence'):
        inputs, out = run_fixed(rule, seed=2, init_x=init_x, mask=mask)
        assert all(torch.equal(x[~mask], init_x[~mask]) for x in inputs + [out])
        assert [int((x[mask] == DRAWN).sum()) for x in inputs[1:]] == [4, 8, 12]   # 2, 4, 6 of 8 per image


def test_confidence_ranks_under_the_steps_temperature():
    """Two positions both drawing code 0: A's rival codes are many and weak, B's one and strong. At T=1,
    p(A) = e / (e + 7) = 0.28 < p(B) = 0.52; at T=0.1, p(A) = 0.9997 > p(B) = 1 / (1 + e^-1) = 0.73."""
    logits = torch.zeros(1, 8, 1, 2)
    logits[0, 0, 0] = torch.tensor([1.0, 2.0])
    logits[0, 1, 0, 1], logits[0, 2:, 0, 1] = 1.9, -10.0

    def renoised(temperature):
        model = Fixed(logits)
        sample(model, {}, (1, 1, 2), cfg=None, steps=2, top_k=1, temperature=temperature, renoise_rule='confidence',
               generator=torch.Generator().manual_seed(4))
        assert (model.inputs[0] != 0).all()           # the noise differs from the drawn code 0 everywhere
        return (model.inputs[1] != 0)[0, 0].tolist()  # re-noised after step 0: 1 of 2 (t_next = 0.5)
    assert renoised(1.0) == [True, False] and renoised(0.1) == [False, True]
    # argmax draws read no temperature (0 is allowed there): confidence ranks at temperature 1, not by nan
    assert all(map(torch.equal, run_fixed('confidence', seed=3, temperature=0.0)[0], replay('confidence', 'start', 3)))


def test_random_is_the_default_and_gives_the_published_tokens(tiny_paella, paella_fixture, conds):
    _, _, exp, _ = paella_fixture
    torch.manual_seed(42)
    tokens = sample(tiny_paella, conds[0], (2, 16, 16), unconditional_inputs=conds[1], steps=6, renoise_steps=5,
                    temperature=(1.0, 0.2), cfg=4.0, mode='multinomial', renoise_rule='random')
    assert torch.equal(tokens, exp['sampled_seed42'])
    assert Settings().renoise_rule == Settings.v3().renoise_rule == 'random'
    assert RENOISE_RULES == tuple(RULES) == checks.RENOISE_RULES == ('random', 'confidence', 'halton', 'critic')


@pytest.fixture
def tiny_critic(tiny_paella):
    """The fixture's tiny model with a (random) noise-detection head."""
    from paella import Paella
    model = Paella(Paella.make_config('tiny', **{**tiny_paella.config_dict(), 'critic': True})).eval()
    model.load_state_dict(tiny_paella.state_dict(), strict=False)
    return model


@pytest.mark.parametrize('rule', RENOISE_RULES)
def test_each_rule_is_seeded_reproducible(tiny_critic, conds, rule):
    def run(seed, r=rule):
        return sample(tiny_critic, conds[0], (2, 16, 16), conds[1], steps=4, cfg=3.0, renoise_rule=r,
                      generator=torch.Generator().manual_seed(seed))
    a = run(1)
    assert torch.equal(a, run(1)) and not torch.equal(a, run(2))
    assert rule == 'random' or not torch.equal(a, run(1, 'random'))     # the rule changes the result


def test_an_unknown_rule_is_named_with_the_choices(tiny_paella, conds):
    with pytest.raises(ValueError, match=r"renoise_rule must be one of \('random', 'confidence', 'halton', "
                                         r"'critic'\), got 'best'"):
        sample(tiny_paella, conds[0], (1, 16, 16), steps=2, renoise_rule='best')
    with pytest.raises(ValueError, match="needs a model with a noise-detection head"):
        sample(tiny_paella, conds[0], (1, 16, 16), steps=2, renoise_rule='critic')
    with pytest.raises(ValueError, match="renoise_rule must be one of random, confidence, halton, critic, got 'best'"):
        checks.settings(Settings(renoise_rule='best'), checks.Caps())
    from paella.serve.limits import BadRequest, Fields, Limits
    with pytest.raises(BadRequest, match="renoise must be one of random, confidence, halton, critic, got 'best'"):
        Fields(Limits()).sampling({'renoise': 'best'})
    assert Fields(Limits()).sampling({'renoise': 'halton'})['renoise_rule'] == 'halton'
    assert 'renoise_rule' not in Fields(Limits()).sampling({})                  # not given: the model's


@pytest.mark.parametrize('argv', [['generate', 'red apple'], ['edit', '{apple}', 'tomato']])
def test_renoise_flag_reaches_the_sampler(argv, tmp_path, monkeypatch, hf_offline):
    from PIL import Image
    import paella.pipeline
    from paella.cli import main
    Image.new('RGB', (64, 64), (220, 30, 30)).save(tmp_path / 'apple.png')
    seen, real = [], paella.pipeline.sample
    monkeypatch.setattr(paella.pipeline, 'sample', lambda *a, **k: seen.append(k['renoise_rule']) or real(*a, **k))
    argv = [a.format(apple=tmp_path / 'apple.png') for a in argv]
    assert main(argv + ['--renoise', 'halton', '--steps', '2', '-o', str(tmp_path / 'out.png')]) == 0
    assert main(argv + ['--steps', '1', '-o', str(tmp_path / 'out.png')]) == 0
    assert seen == ['halton', 'critic']                         # not given: the shipped model's own rule
