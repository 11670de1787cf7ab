"""Re-noising: after each step's draw, which positions go back to noise for the next step, and with what.

A rule picks the positions. Every rule has one signature::

    rule(logits, tokens, t_next, generator, *, where=None, noise_logits=None) -> (B, H, W) bool, True = re-noise

logits (B, C, H, W): the step's guided logits at the step's temperature, i.e. the distribution ``tokens``
(B, H, W) were drawn from (before the top_k / typical filters); t_next (B,): the next step's noise level;
where (B, H, W) bool: the positions being generated (the sampler's ``mask``; None: all of them), the only
ones a rule counts; noise_logits (B, H, W): the model's noise-detection head on the drawn tokens (its
"this token is noise" logits), computed only for the rule that reads them. A rule reads what it needs.

- ``random`` (the published rule): each position with probability t_next, drawn as `add_noise` draws it.
- ``confidence`` (MaskGIT's): the round(t_next * n) positions whose drawn token had the lowest probability,
  n the number of generated positions; ties go to the earlier position in raster order.
- ``halton`` (Halton-MaskGIT, Besnier et al., ICLR 2025): a fixed, spatially spread order over the grid,
  the 2-D Halton sequence (rows in base 2, columns in base 3); the first n - round(t_next * n) generated
  positions of that order are kept, the rest re-noised, so the kept set only grows from step to step.
- ``critic`` (Token-Critic, Lezama et al. 2022): the round(t_next * n) positions the model's noise-detection
  head (``Paella(critic=True)``) rates most likely noise, asked of the drawn grid at level t_next: one more
  forward per step, conditional branch only. The head learnt its question for free in training (the trainer
  knows which positions it replaced: ``--critic-weight``).

What replaces the chosen tokens is ``renoise_mode``'s: the initial noise tokens ('start', published), the
step's input tokens ('prev') or fresh random ones ('rand').
"""
import functools

import numpy as np
import torch

from .noise import add_noise


def random_rule(logits, tokens, t_next, generator, *, where=None, noise_logits=None):
    """The published rule: ``rand <= t_next`` per position, one torch.rand over (B, H, W) as `add_noise`
    draws it (so a seeded run gives the published tokens)."""
    u = torch.rand(tokens.shape, device=tokens.device, generator=generator)
    return u <= t_next[:, None, None]


def confidence_rule(logits, tokens, t_next, generator, *, where=None, noise_logits=None):
    """The least probable drawn tokens: log p(token) (B, H, W) under the step's distribution, lowest first."""
    logp = logits.gather(1, tokens[:, None])[:, 0] - logits.logsumexp(dim=1)
    return lowest(logp, t_next, where)


def halton_rule(logits, tokens, t_next, generator, *, where=None, noise_logits=None):
    """The positions latest in the grid's Halton order: the same for every image and every seed."""
    b, h, w = tokens.shape
    later = -halton_order(h, w).to(tokens.device, torch.float32)            # (H, W): the later, the lower
    return lowest(later.expand(b, h, w), t_next, where)


def critic_rule(logits, tokens, t_next, generator, *, where=None, noise_logits=None):
    """The positions the noise-detection head rates most likely noise."""
    return lowest(-noise_logits.float(), t_next, where)


RULES = {'random': random_rule, 'confidence': confidence_rule, 'halton': halton_rule, 'critic': critic_rule}
SCALED = {'confidence'}        # the rules that read the logits: the others skip a pass over (B, C, H, W)


def lowest(scores, t_next, where=None):
    """Bool (B, H, W): in each image, the round(t_next * n) positions with the lowest ``scores`` (B, H, W)
    among the n ``where`` positions (all when None); ties go to the earlier position in raster order."""
    b, h, w = scores.shape
    n = where.flatten(1).sum(1) if where is not None else torch.full((b,), h * w, device=scores.device)
    if where is not None:
        scores = scores.masked_fill(~where, float('inf'))                  # never chosen: sorted last
    count = (t_next.float() * n).round().long()                            # (B,)
    order = scores.flatten(1).argsort(dim=1, stable=True)                  # (B, HW) positions, lowest first
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(h * w, device=order.device).expand(b, -1))
    return (ranks < count[:, None]).view(b, h, w)


@functools.lru_cache(maxsize=16)
def halton_order(h, w):
    """(H, W) long: each position's rank in the 2-D Halton sequence over an H x W grid. Point i = 1, 2, ...
    is (row, col) = (floor(H * phi_2(i)), floor(W * phi_3(i))), phi_b the base-b radical inverse; a cell's
    rank is the order of the first point that falls in it (later points in a visited cell are skipped).
    In exact integers (numpy: a one-off computation of a few hundred thousand numbers at most), so a point
    on a cell border falls where exact arithmetic puts it."""
    n = 4 * h * w
    while True:
        i = np.arange(1, n + 1)
        cells = _scaled_radical_inverse(i, 2, h) * w + _scaled_radical_inverse(i, 3, w)   # (n,) raster index
        visited, first = np.unique(cells, return_index=True)       # every visited cell, its first point
        if len(visited) == h * w:
            return torch.from_numpy(first.argsort().argsort()).view(h, w)
        n *= 2


def _scaled_radical_inverse(i, base, size):
    """floor(size * phi_base(i)) for integers i (N,) >= 1: phi_base(i) = num / base ** digits, num the
    ``digits`` base-``base`` digits of i in reverse order."""
    digits = 1
    while base ** digits <= i.max():
        digits += 1
    num, rest = np.zeros_like(i), i.copy()
    for _ in range(digits):
        num, rest = num * base + rest % base, rest // base
    return num * size // base ** digits


def renoiser(rule, renoise_mode, temperatures, init_noise, num_labels, where=None, generator=None, critic=None):
    """The re-noising step: ``renoise(logits, tokens, prev, t_next, i)`` -> the next step's input (B, H, W),
    ``rule``'s positions replaced by ``renoise_mode``'s tokens. logits (B, C, H, W): step i's guided logits,
    scaled here by ``temperatures[i]`` for the rules that read them; prev: step i's input tokens.
    critic(tokens, t) -> noise logits (B, H, W): the model's head, for the 'critic' rule."""
    choose = RULES[rule]

    def renoise(logits, tokens, prev, t_next, i):
        if rule in SCALED:
            logits = logits.float() / temperatures[i]
        noise_logits = critic(tokens, t_next) if rule == 'critic' else None
        chosen = choose(logits, tokens, t_next, generator, where=where, noise_logits=noise_logits)
        random_x = {'start': init_noise, 'prev': prev, 'rand': None}[renoise_mode]
        return add_noise(tokens, t_next, num_labels, mask=chosen.long(), random_x=random_x, generator=generator)[0]
    return renoise
