"""The CLIP prior and its diffusion against the published code's vectors."""
import json

import pytest
import torch

from paella.prior import CosineSchedule, PriorModel, sample_prior
from conftest import fixtures_dir

# The fixture's noise levels: 8 steps from 8/9 down to 0.
TIMESTEPS = torch.linspace(1, 0, 10)[1:]


def test_prior_output_matches_published(prior, prior_fixture):
    _, inp, exp, _ = prior_fixture
    with torch.no_grad():
        torch.testing.assert_close(prior(inp['x'], inp['r'], inp['c']), exp['prior_out'], atol=1e-5, rtol=0)
    diffused, _ = CosineSchedule().diffuse(inp['x'], inp['diffuse_t'], inp['diffuse_noise'])
    torch.testing.assert_close(diffused, exp['diffused'], atol=1e-5, rtol=0)


@pytest.mark.parametrize('sampler, seed', [('ddpm', 42), ('ddim', 43)])
@pytest.mark.parametrize('levels', [dict(timesteps=TIMESTEPS), dict(steps=8)])
def test_prior_samples_reproduce_published(prior, prior_fixture, sampler, seed, levels):
    """Given the levels, or by default from the step count: Diffuzz.sample(timesteps=8)'s levels are
    linspace(1, 0, 10)[1:] (a Pipeline's prior_steps=60 ran at linspace(1, 0, 61) before)."""
    _, inp, exp, _ = prior_fixture
    torch.manual_seed(seed)
    out = sample_prior(prior, inp['c'], cfg=3.0, sampler=sampler, **levels)
    # float32 through 8 guided steps: identical on a Zen 4, up to 2.1e-5 apart on an Intel Xeon (kernels sum
    # in another order); a wrong step, level or draw moves the sample by O(1)
    torch.testing.assert_close(out, exp[f'{sampler}_sample_seed{seed}'], atol=1e-4, rtol=1e-4)


def test_prior_generator_reproducible(prior, prior_fixture):
    c = prior_fixture[1]['c']
    run = lambda s: sample_prior(prior, c, steps=5, generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


def test_full_size_prior_has_published_keys_and_shapes():
    ref = json.loads((fixtures_dir() / 'prior_v1_state_dict_shapes.json').read_text())
    with torch.device('meta'):
        model = PriorModel()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref['state_dict_shapes']
    assert model.num_parameters() == ref['num_parameters'] == 899_770_624


def test_prior_bad_input(prior):
    with pytest.raises(ValueError, match=r'prior input c must have shape \(B, 16\)'):
        prior(torch.zeros(2, 16), torch.zeros(2), torch.zeros(2, 17))
    with pytest.raises(ValueError, match='sampler'):
        sample_prior(prior, torch.zeros(2, 16), sampler='euler')
