"""Paella's sampler: one pure function for text-to-image, inpainting, outpainting, image-to-image and more.

Start from random tokens (or ``init_x``), and for each of ``steps`` noise levels t from ``t_start`` to
``t_end``: predict logits for every position (with classifier-free guidance), draw new tokens at a
temperature, and re-noise a fraction t_next of them for the next step. A ``mask`` (True = generate) keeps
every other position fixed to ``init_x``: that is inpainting and outpainting. Starting from ``init_x`` at
``t_start < 1`` is image-to-image. Other conditions in ``model_inputs`` give variations and interpolation.

With ``mode="multinomial"`` and ``generator=None`` the random calls are the published code's, in its
order (``torch.randint`` for the initial tokens, ``torch.multinomial`` per step, ``torch.rand`` for each
re-noising mask), so a seeded global RNG reproduces the published samples token for token.

`sample` is the loop alone. Guidance (cfg schedule, the conditional-steps cutoff, the batched forward, the
conditioning cache, attention weights) is a model wrapper, `guidance.Guided`; the draw step with its
filters is `drawer`; the re-noising step with its rules (which positions go back to noise) is
`renoise.renoiser`; every argument is checked first, in `check_arguments`.
"""
import torch

from .guidance import Guided, is_guided, schedule
from .noise import check_token_range
from .renoise import RULES, renoiser
from .vq import nearest_code

MODES = ('multinomial', 'cdf', 'argmax', 'quant')
RENOISE_MODES = ('start', 'prev', 'rand')
RENOISE_RULES = tuple(RULES)         # which positions are re-noised: paella.renoise


def top_k_filter(logits, k):
    """Keep the k largest logits at every position of (B, C, H, W); the rest become -inf."""
    kth = logits.topk(min(k, logits.size(1)), dim=1).values[:, -1:]   # (B, 1, H, W)
    return logits.masked_fill(logits < kth, float('-inf'))


def typical_filter(logits, mass=0.2, min_tokens=1):
    """Locally typical filtering (the first Paella's): keep the tokens whose surprise is nearest the
    entropy, until they hold ``mass`` of the probability; at least ``min_tokens``. logits: (B, C, H, W)."""
    logp = logits.log_softmax(dim=1)
    entropy = -(logp * logp.exp()).nansum(dim=1, keepdim=True)       # (B, 1, H, W)
    distance, order = (-logp - entropy).abs().sort(dim=1)            # most typical first
    cum = logits.gather(1, order).softmax(dim=1).cumsum(dim=1)
    last = (cum < mass).sum(dim=1, keepdim=True).clamp(max=logits.size(1) - 1)
    remove = distance > distance.gather(1, last)
    remove[:, :min_tokens] = False
    return logits.masked_fill(remove.scatter(1, order, remove), float('-inf'))


def draw_tokens(logits, temperature, mode='multinomial', generator=None, codebook=None):
    """Tokens (B, H, W) from logits (B, C, H, W)."""
    if mode == 'argmax':
        return logits.argmax(dim=1)
    b, c, h, w = logits.shape
    if mode == 'cdf':
        # Inverse CDF on channels-last logits: one uniform number per position, where torch.multinomial
        # draws one exponential per code (8192 per position for v3) and needs a permuted copy.
        z = logits.permute(0, 2, 3, 1).to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        cdf = z.sub_(z.amax(-1, keepdim=True)).mul_(1 / float(temperature)).exp_().cumsum_(-1)  # (B, H, W, C)
        u = torch.rand((b, h, w, 1), device=logits.device, generator=generator) * cdf[..., -1:]
        return torch.searchsorted(cdf, u, right=True)[..., 0].clamp_(max=c - 1)
    logits = logits.float()
    scores = logits.div(temperature).softmax(dim=1)
    if mode == 'multinomial':
        probs = scores.permute(0, 2, 3, 1).reshape(-1, c)            # (BHW, C), the published layout
        return torch.multinomial(probs, 1, generator=generator)[:, 0].view(b, h, w)
    # 'quant': the expected code vector under the distribution, snapped to the nearest code.
    expected = scores.permute(0, 2, 3, 1).reshape(-1, c) @ codebook.to(scores.dtype)   # (BHW, D)
    return nearest_code(expected.float(), codebook.float()).view(b, h, w)


@torch.no_grad()
def sample(model, model_inputs, latent_shape=None, unconditional_inputs=None, *, steps=12, renoise_steps=None,
           temperature=(1.0, 0.2), cfg=8.0, t_start=1.0, t_end=0.0, sampling_conditional_steps=None,
           sampling_quant_steps=None, init_x=None, mask=None, mode='multinomial', renoise_mode='start',
           renoise_rule='random', typical_mass=None, typical_min_tokens=1, top_k=None, codebook=None,
           attn_weights=None, generator=None, callback=None, batch_cfg=False, cache=False):
    """Sample token grids (B, H, W).

    model: called as ``model(tokens, t, **inputs)`` -> logits (B, C, H, W); has ``num_labels``.
    model_inputs / unconditional_inputs: keyword conditions of the conditional / unconditional branch
        (unconditional defaults to zeros like the conditional inputs, as in the published v3 code).
    latent_shape: (B, H, W); may be left out when ``init_x`` is given.
    steps, renoise_steps (default and at most steps - 1): denoising steps, and how many of them re-noise
        afterwards.
    temperature, cfg: a number or a linear (start, end) schedule; cfg None or 0 disables guidance.
    t_start, t_end: noise levels of the first and past-the-last step.
    sampling_conditional_steps: guidance only for the first this many steps.
    sampling_quant_steps: from this step on the draw is 'quant' whatever ``mode`` says (the published
        demo's switch; needs ``codebook``).
    init_x (B, H, W): starting tokens instead of random ones. mask (B, H, W), True = generate: other
        positions stay exactly init_x.
    mode: 'multinomial' (the published categorical step), 'cdf' (the same distribution by inverse CDF: one
        random number per position, several times faster), 'argmax', or 'quant' (needs ``codebook`` (K, D)).
    renoise_rule: which positions are re-noised after each step (`paella.renoise`): 'random' (published:
        each with probability t_next), 'confidence' (the round(t_next * H * W) least probable drawn tokens
        under the step's guided distribution at its temperature) or 'halton' (all but the first
        (1 - t_next) * H * W positions of a spatially spread Halton order over the grid; the kept set only
        grows) or 'critic' (the round(t_next * H * W) positions the model's noise-detection head rates most
        likely noise, on the drawn grid: one more conditional forward per step; needs ``config.critic``).
        With a ``mask``, the counts are of the masked positions.
    renoise_mode: what replaces them: the initial random tokens ('start', v3), this step's input ('prev'), or
        fresh random tokens ('rand').
    typical_mass / typical_min_tokens, top_k: optional filters on the guided logits.
    attn_weights (Lc,): attention reweighting of the last Lc conditioning keys, conditional branch only.
    generator: a torch.Generator for every random draw; None uses the global RNG.
    callback(i, tokens): called after each step's draw, before re-noising.
    batch_cfg: one forward over the conditional and unconditional inputs stacked (when their shapes allow;
        otherwise two forwards, as published). cache: compute the conditioning's attention keys and values
        once (``model.prepare``) instead of at every step. Both compute the published results up to
        float32 rounding, faster: the tokens are identical unless a draw falls within ~1e-5 of a tie
        between two codes, where one token may flip (and the rest of the run follow it).
    """
    latent_shape, mask = check_arguments(model, latent_shape, steps, mode, renoise_mode, codebook, init_x, mask,
                                         typical_mass, top_k, temperature, cfg, sampling_quant_steps, renoise_rule)
    b, device = latent_shape[0], _device(model_inputs, init_x) or torch.device('cpu')
    guided = Guided(model, model_inputs, unconditional_inputs, cfg=cfg, steps=steps, b=b, attn_weights=attn_weights,
                    conditional_steps=sampling_conditional_steps, batch=batch_cfg, cache=cache, exact=mode != 'cdf')
    draw = drawer(steps, temperature, mode, generator, codebook, top_k, typical_mass, typical_min_tokens,
                  sampling_quant_steps)
    # never after the last step: that would only add noise to the result (a model's renoise_steps = 11 of
    # 12 steps stays right when a caller asks for fewer steps)
    renoise_steps = steps - 1 if renoise_steps is None else min(renoise_steps, steps - 1)

    init_noise = torch.randint(0, model.num_labels, latent_shape, device=device, generator=generator)
    # argmax draws read no temperature (it may be 0): confidence then ranks under the logits' own softmax
    renoise = renoiser(renoise_rule, renoise_mode, schedule(1.0 if mode == 'argmax' else temperature, steps),
                       init_noise, model.num_labels, mask, generator, critic=guided.critic)

    def keep(x):                                       # positions outside the mask stay init_x's
        return x if mask is None else torch.where(mask, x, init_x)
    x = init_noise.clone() if init_x is None else keep(init_noise) if mask is not None else init_x.clone()
    t_list = torch.linspace(t_start, t_end, steps + 1)
    for i in range(steps):
        t = torch.ones(b, device=device) * t_list[i]
        logits = guided(x, t, i)                       # (B, C, H, W)
        prev, x = x, keep(draw(logits, i))
        if callback is not None:
            callback(i, x)
        if i < renoise_steps:
            t_next = torch.ones(b, device=device) * t_list[i + 1]
            x = keep(renoise(logits, x, prev, t_next, i))
        del logits                                     # not held through the next step's forward
    return x


def check_arguments(model, latent_shape, steps, mode, renoise_mode, codebook, init_x, mask, typical_mass, top_k,
                    temperature, cfg, quant_steps=None, renoise_rule='random'):
    """ValueError for any argument `sample` cannot take, before any work; (latent_shape, mask as bool)."""
    if latent_shape is None:
        if init_x is None:
            raise ValueError("give latent_shape (B, H, W) or init_x")
        latent_shape = tuple(init_x.shape)
    latent_shape = tuple(int(s) for s in latent_shape)
    if len(latent_shape) != 3 or min(latent_shape) < 1:
        raise ValueError(f"latent_shape must be (B, H, W) with positive sizes, got {latent_shape}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if renoise_mode not in RENOISE_MODES:
        raise ValueError(f"renoise_mode must be one of {RENOISE_MODES}, got {renoise_mode!r}")
    if renoise_rule not in RENOISE_RULES:
        raise ValueError(f"renoise_rule must be one of {RENOISE_RULES}, got {renoise_rule!r}")
    if renoise_rule == 'critic' and getattr(model, 'critic', None) is None:
        raise ValueError("renoise_rule 'critic' needs a model with a noise-detection head (Paella config.critic; "
                         "trained with --critic-weight)")
    if (mode == 'quant' or quant_steps is not None) and codebook is None:
        raise ValueError("mode='quant' and sampling_quant_steps need the VQGAN codebook: "
                         "codebook=vq.vquantizer.codebook.weight")
    if init_x is not None and tuple(init_x.shape) != latent_shape:
        raise ValueError(f"init_x has shape {tuple(init_x.shape)}, expected {latent_shape}")
    if init_x is not None:
        check_token_range(init_x, model.num_labels)              # once here, not in each step's forward
    if mask is not None:
        if init_x is None:
            raise ValueError("a mask needs init_x: the tokens that stay where the mask is False")
        if tuple(mask.shape) != latent_shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the token grid {latent_shape}")
        mask = mask.bool()
    if typical_mass is not None and not 0 < typical_mass <= 1:
        raise ValueError(f"typical_mass must be in (0, 1], got {typical_mass}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if mode != 'argmax' and (checked_schedule('temperature', temperature, steps) <= 0).any():
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if is_guided(cfg):
        checked_schedule('cfg', cfg, steps)                      # a malformed schedule fails here, not mid-run
    return latent_shape, mask


def checked_schedule(name, value, steps):
    """`schedule`, or a ValueError naming ``name`` for what is not a finite number or (start, end) pair
    (nan or inf would draw a pale grid without a word)."""
    try:
        values = schedule(value, steps)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or a (start, end) pair, got {value!r}") from None
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} must be finite, got {value!r}")
    return values


def drawer(steps, temperature, mode, generator, codebook, top_k, typical_mass, typical_min_tokens, quant_steps=None):
    """The draw step: ``draw(logits, i)`` -> tokens, with the optional filters, step i's temperature and
    mode ('quant' from step ``quant_steps`` on)."""
    temperatures = schedule(temperature, steps)
    quant_steps = steps if quant_steps is None else quant_steps

    def draw(logits, i):
        if top_k is not None:
            logits = top_k_filter(logits, top_k)
        if typical_mass is not None:
            logits = typical_filter(logits, typical_mass, typical_min_tokens)
        return draw_tokens(logits, temperatures[i], 'quant' if i >= quant_steps else mode, generator, codebook)
    return draw


def _device(*groups):
    """The device of the first tensor found in the (nested dicts, lists and tuples of) inputs."""
    for g in groups:
        if isinstance(g, torch.Tensor):
            return g.device
        values = g.values() if isinstance(g, dict) else g if isinstance(g, (list, tuple)) else []
        for v in values:
            found = _device(v)
            if found is not None:
                return found
    return None
