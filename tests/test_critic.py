"""The noise-detection head (Token-Critic's question, "was this token replaced?"): trained for free beside the
token loss, saved with the model, absent from published models, and the `critic` re-noising rule that reads
it recovering a tiny model's training grids in fewer steps than the published rule."""
import json

import pytest
import torch
from safetensors.torch import save_file

from paella import Paella, sample
from paella.train import RECIPES, train

MODES, SIDE, BLOCK = 8, 16, 4


def blocky_data(path):
    """8 token grids of 16x16, each 4x4 blocks of one random code, all under one (zero) caption: a model must
    pick one of 8 pictures and keep every block consistent with it, which one draw cannot do."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (MODES, SIDE // BLOCK, SIDE // BLOCK), generator=g)
    tokens = tokens.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)          # (8, 16, 16)
    save_file({'tokens': tokens.to(torch.int16), 'text': torch.zeros(MODES, 6, 24).half(),
               'text_mask': torch.ones(MODES, 6, dtype=torch.bool), '_uncond_text': torch.zeros(1, 6, 24).half()},
              str(path), metadata={'paella': json.dumps({'captions': ['a picture'] * MODES})})
    return tokens


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('critic')
    tokens = blocky_data(tmp / 'd.safetensors')
    cfg = RECIPES['generator'].config(data=str(tmp / 'd.safetensors'), out=str(tmp / 'run'), preset='tiny',
                                      precision='fp32', steps=800, batch_size=8, lr=1e-3, warmup=10, log_every=10,
                                      save_every=1000, tensorboard=False, critic_weight=1.0)
    train(cfg)
    log = [json.loads(line) for line in (tmp / 'run' / 'metrics.jsonl').read_text().splitlines()]
    return Paella.from_pretrained(tmp / 'run' / 'model'), tokens, log


def test_the_heads_cross_entropy_falls(trained):
    _, _, log = trained
    bce = [r['critic_bce'] for r in log]
    print(f"critic BCE: first {bce[0]:.3f}, last {bce[-1]:.3f}")
    assert bce[-1] < 0.6 * bce[0], bce


def recovered(model, tokens, rule, steps, n=32):
    """How many of n samples are exactly one of the training grids."""
    out = sample(model, {'byt5': torch.zeros(n, 6, 24)}, (n, SIDE, SIDE), cfg=None, steps=steps,
                 temperature=(1.0, 0.05), renoise_rule=rule, generator=torch.Generator().manual_seed(0))
    return int((out[:, None] == tokens[None]).flatten(2).all(2).any(1).sum())


def steps_to_recover_all(model, tokens, rule):
    return next((s for s in (2, 3, 4, 6, 8, 12) if recovered(model, tokens, rule, s) == 32), None)


def test_critic_recovers_the_training_grids_in_fewer_steps_than_random(trained):
    model, tokens, _ = trained
    assert model.config.critic and model.critic is not None           # saved in the folder, loaded back
    needed = {rule: steps_to_recover_all(model, tokens, rule) for rule in ('random', 'confidence', 'critic')}
    print(f"steps until all 32 samples are training grids: {needed}")
    assert needed['random'] is not None and needed['critic'] < needed['random'], needed


def test_published_models_have_no_head_and_load_as_before(paella_fixture):
    sd = paella_fixture[0]
    model = Paella(Paella.make_config('tiny'))
    model.load_state_dict(sd, strict=True)                            # the published layout, unchanged
    assert model.critic is None and not any(k.startswith('critic') for k in model.state_dict())
    x, r = torch.zeros(1, 8, 8, dtype=torch.long), torch.ones(1)
    with pytest.raises(ValueError, match="no noise-detection head"):
        model(x, r, torch.zeros(1, 3, 24), critic=True)
    headed = Paella(Paella.make_config('tiny', critic=True))
    assert sorted(set(headed.state_dict()) - set(model.state_dict())) == ['critic.bias', 'critic.weight']
    logits, noise = headed(x, r, torch.zeros(1, 3, 24), critic=True)
    assert logits.shape == (1, 64, 8, 8) and noise.shape == (1, 8, 8)


def test_critic_weight_needs_the_head(tmp_path):
    from paella.train.recipes import GeneratorTask
    blocky_data(tmp_path / 'd.safetensors')
    cfg = RECIPES['generator'].config(data=str(tmp_path / 'd.safetensors'), out=str(tmp_path / 'run'),
                                      preset='tiny', critic_weight=1.0, model={'critic': False})
    with pytest.raises(ValueError, match="--model.critic false has none"):
        GeneratorTask(cfg, torch.device('cpu'))
    with pytest.raises(ValueError, match="--critic-weight are for full training"):
        RECIPES['lora'].config(data=str(tmp_path / 'd.safetensors'), critic_weight=1.0).check(1)
