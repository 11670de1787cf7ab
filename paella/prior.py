"""The CLIP prior of Paella v3: CLIP text embedding -> CLIP image embedding, by continuous diffusion.

``PriorModel`` is the published residual MLP (its keys load strictly from ``prior_v1.pt``); it predicts
the noise in a noised image embedding x (B, clip_r) at noise level r (B,) given a text embedding c
(B, clip_r). ``sample_prior`` runs the published cosine-schedule diffusion (DDPM or DDIM) with
classifier-free guidance.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import Pretrained
from .noise import r_embedding


@dataclass
class PriorConfig:
    """Constructor arguments of `PriorModel`; the defaults are the published prior (899,770,624 params)."""
    clip_r: int = 1024          # CLIP embedding width (CLIP-H: 1024)
    c_hidden: int = 1280
    c_r: int = 64               # width of the noise-level embedding
    num_blocks: int = 48


PRESETS = {
    'v1': {},
    'small': dict(clip_r=384, c_hidden=512, c_r=32, num_blocks=8),
    'tiny': dict(clip_r=16, c_hidden=32, c_r=8, num_blocks=3),
}


class PriorModel(Pretrained, nn.Module, config_class=PriorConfig, presets=PRESETS, default_preset='v1',
                 model_type='prior'):
    """The v1 prior: CLIP text embedding -> CLIP image embedding, an MLP denoiser of residual blocks."""

    def __init__(self, config: PriorConfig | None = None, **kwargs):
        super().__init__()
        cfg = self.configure(config, kwargs)
        self.c_r = cfg.c_r
        c_in = cfg.clip_r + cfg.c_hidden + cfg.c_r
        self.blocks = nn.ModuleList([nn.Linear(cfg.clip_r, cfg.c_hidden)])
        for _ in range(cfg.num_blocks):
            self.blocks.append(nn.Sequential(
                nn.Linear(c_in, cfg.c_hidden * 4, bias=False), nn.LayerNorm(cfg.c_hidden * 4), nn.GELU(),
                nn.Linear(cfg.c_hidden * 4, cfg.c_hidden, bias=False), nn.LayerNorm(cfg.c_hidden)))
            self.blocks[-1][0].weight.data *= math.sqrt(1 / cfg.num_blocks)
        self.blocks.append(nn.Linear(cfg.c_hidden, cfg.clip_r))

    def forward(self, x, r, c):
        """Predicted noise (B, clip_r) for the noised embedding x (B, clip_r), level r (B,), text c (B, clip_r)."""
        cfg = self.config
        for name, v in (('x', x), ('c', c)):
            if v.dim() != 2 or v.shape[1] != cfg.clip_r:
                raise ValueError(f"prior input {name} must have shape (B, {cfg.clip_r}), got {tuple(v.shape)}")
        dtype = self.blocks[0].weight.dtype                          # bf16 weights: float32 in and out
        r = r_embedding(r, self.c_r).to(dtype)                       # (B, c_r)
        x, c = self.blocks[0](x.to(dtype)), c.to(dtype)              # (B, c_hidden)
        for block in self.blocks[1:-1]:
            x = block(torch.cat([x, c, r], dim=1)) + x               # residual MLP block
        return self.blocks[-1](x).float()


class CosineSchedule:
    """The published continuous cosine schedule: alpha_cumprod(t) for t in [0, 1], clamped to [1e-4, 0.9999]."""

    def __init__(self, s=0.008):
        self.s = torch.tensor([s])
        self.init = torch.cos(self.s / (1 + self.s) * torch.pi * 0.5) ** 2

    def alpha_cumprod(self, t):
        s = self.s.to(t.device)
        a = torch.cos((t + s) / (1 + s) * torch.pi * 0.5) ** 2 / self.init.to(t.device)
        return a.clamp(0.0001, 0.9999)

    def diffuse(self, x, t, noise=None, generator=None):
        """Noised x at levels t (B,): sqrt(a) x + sqrt(1 - a) noise. Returns (noised, noise)."""
        if noise is None:
            noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        a = self.alpha_cumprod(t).view(-1, *[1] * (x.dim() - 1))
        return a.sqrt() * x + (1 - a).sqrt() * noise, noise

    def step(self, x, t, t_prev, noise, sampler='ddpm', generator=None):
        """One step from level t to t_prev given the predicted noise."""
        def view(v):
            return v.view(-1, *[1] * (x.dim() - 1))
        a, a_prev = view(self.alpha_cumprod(t)), view(self.alpha_cumprod(t_prev))
        if sampler == 'ddim':
            x0 = (x - (1 - a).sqrt() * noise) / a.sqrt()
            return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * noise
        alpha = a / a_prev
        mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * noise / (1 - a).sqrt())
        z = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
        std = ((1 - alpha) * (1.0 - a_prev) / (1.0 - a)).sqrt() * z
        return mu + std * view((t_prev != 0).float())


@torch.no_grad()
def sample_prior(model, c, steps=60, cfg=3.0, sampler='ddpm', t_start=1.0, t_end=0.0, c_uncond=None,
                 x_init=None, generator=None, schedule=None, timesteps=None):
    """Image embeddings (B, clip_r) for text embeddings c (B, clip_r).

    The noise levels are the published code's, ``linspace(t_start, t_end, steps + 2)[1:]`` (the first step
    is at 1 - 1/(steps + 1), never at pure noise), or the 1-D tensor ``timesteps``.

    Guidance is ``lerp(uncond, cond, cfg)`` with zero embeddings as the unconditional input unless
    ``c_uncond`` is given; cfg None disables it. Random draws: the initial noise ``randn(B, clip_r)``,
    then one ``randn`` per DDPM step (DDIM draws none), all from ``generator`` (global RNG when None).
    """
    if sampler not in ('ddpm', 'ddim'):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    if timesteps is None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        timesteps = torch.linspace(t_start, t_end, steps + 2)[1:]
    elif timesteps.dim() != 1 or len(timesteps) < 2:
        raise ValueError(f"timesteps must be a 1-D tensor of at least 2 noise levels, got {tuple(timesteps.shape)}")
    schedule = schedule or CosineSchedule()
    b = c.shape[0]
    t_list = timesteps.to(c.device)
    x = torch.randn(b, c.shape[1], device=c.device, generator=generator) if x_init is None else x_init.clone()
    if cfg is not None and c_uncond is None:
        c_uncond = torch.zeros_like(c)
    for i in range(len(t_list) - 1):
        t, t_prev = t_list[i].expand(b), t_list[i + 1].expand(b)
        noise = model(x, t, c)
        if cfg is not None:
            noise = torch.lerp(model(x, t, c_uncond), noise, cfg)
        x = schedule.step(x, t, t_prev, noise, sampler, generator)
    return x
