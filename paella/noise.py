"""The noise process of Paella, shared by the model, the prior, the sampler and the trainer.

Noise is not Gaussian here: a fraction t of the tokens is replaced by random codebook tokens. The model is
told t through a sinusoidal embedding of it, and the trainer weights the loss of kept tokens by t.
"""
import math

import torch
import torch.nn.functional as F


def r_embedding(r, dim, max_positions=10000):
    """Sinusoidal embedding (B, dim) of a noise level r (B,) in [0, 1] (the published formula)."""
    r = r * max_positions
    half_dim = dim // 2
    emb = math.log(max_positions) / (half_dim - 1)
    emb = torch.arange(half_dim, device=r.device).float().mul(-emb).exp()
    emb = r[:, None] * emb[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1), mode='constant')
    return emb


def add_noise(x, t, num_labels, mask=None, random_x=None, generator=None):
    """Replace a fraction t of the tokens x (B, H, W) by random tokens.

    mask (B, H, W) marks the positions to replace (drawn as ``rand <= t`` when not given) and random_x
    supplies their new values (uniform over the codebook when not given). Returns (noised_x, mask).
    Random draws are made in the published order: mask first, then the tokens.
    """
    if mask is None:
        u = torch.rand(x.shape, device=x.device, generator=generator)
        mask = (u <= t[:, None, None]).long()
    if random_x is None:
        random_x = torch.randint(0, num_labels, x.shape, device=x.device, generator=generator)
    return x * (1 - mask) + random_x * mask, mask


def loss_weight(t, mask, min_val=0.3):
    """Per-token loss weight (B, H, W): 1 on replaced tokens, ``1 - (1 - t)(1 - min_val)`` on kept ones."""
    return 1 - (1 - mask) * ((1 - t) * (1 - min_val))[:, None, None]


def check_token_range(x, num_labels):
    """ValueError unless every token id (the state this noise acts on) lies in [0, num_labels). Reads two
    numbers back from the device: once per sampling call or decode, never in a per-step forward."""
    if x.numel():
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= num_labels:
            raise ValueError(f"token ids must lie in [0, {num_labels - 1}], got values in [{lo}, {hi}]")
