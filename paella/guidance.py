"""Classifier-free guidance as a model wrapper (as k-diffusion wraps it): `Guided` turns a model and its
conditional / unconditional inputs into one callable ``guided(x, t, i) -> logits`` for step i, so the
sampler's loop knows nothing of guidance. It also holds the speed-ups that concern only the conditions:
the conditioning cache (`model.prepare`: the attention keys and values of the conditions, computed once)
and one batched forward over both branches when their inputs can be stacked. Also the published demo's
attention weights (`v3_attn_weights`) and regional prompts as a model wrapper (`RegionalModel`).
"""
import torch


def schedule(value, steps):
    """A number or a (start, end) pair -> a linear schedule tensor (steps,), as the published code makes it."""
    start, end = (value, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else tuple(value)
    return torch.linspace(float(start), float(end), steps)


def _guide(cond, uncond, cfg, exact=True):
    """Classifier-free guidance: the published ``cond * cfg + uncond * (1 - cfg)`` in float32 (exact), or
    the same as one lerp in the model's dtype (one pass over the largest tensor instead of six; lerp
    computes in float32 and rounds once)."""
    if exact:
        return cond.float() * cfg + uncond.float() * (1 - cfg)
    return torch.lerp(uncond, cond, cfg)


class _Unjoinable(Exception):
    pass


def _join(a, b):
    """The conditional and unconditional inputs stacked along the batch; _Unjoinable where they cannot be
    (different keys, sequence lengths or None-ness)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise _Unjoinable
        return torch.cat([a, b])
    if a is None and b is None:
        return None
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: _join(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return type(a)(_join(x, y) for x, y in zip(a, b))
    raise _Unjoinable


def joined(a, b):
    """`_join`, or None when the inputs cannot share one forward."""
    try:
        return _join(a, b)
    except _Unjoinable:
        return None


def is_guided(cfg):
    """cfg None or 0 means no guidance (one forward per step)."""
    return cfg is not None and not (isinstance(cfg, (int, float)) and cfg == 0)


class Guided:
    """``model`` with classifier-free guidance over ``steps``: cfg (a number or a (start, end) schedule) for
    the first ``conditional_steps`` steps, the conditional branch alone after them or when cfg is 0/None.
    attn_weights (Lc,) or (B, Lc) reweight the conditional branch's attention; ``batch``: one forward over
    both branches (batch size ``b``) when their inputs stack; ``cache``: the conditions' keys and values
    computed once; ``exact``: the published float32 guidance formula (else one lerp in the model's dtype)."""

    def __init__(self, model, cond, uncond=None, *, cfg, steps, b, conditional_steps=None, attn_weights=None,
                 batch=False, cache=False, exact=True):
        self.model, self.exact = model, exact
        self.num_labels = model.num_labels
        self.cfgs = schedule(cfg, steps) if is_guided(cfg) else None
        self.conditional_steps = steps if conditional_steps is None else conditional_steps
        if self.cfgs is not None and uncond is None:       # zeros like the conditions, as in the v3 code
            uncond = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
        self.extra = {} if attn_weights is None else {'attn_weights': attn_weights}
        if cache and hasattr(model, 'prepare'):
            cond = model.prepare(**cond)
            if self.cfgs is not None:
                uncond = model.prepare(**uncond)
        self.cond, self.uncond = cond, uncond
        self.joint = joined(cond, uncond) if self.cfgs is not None and batch else None
        self.joint_extra = {}
        if self.joint is not None and attn_weights is not None:
            w = attn_weights if attn_weights.dim() == 2 else attn_weights[None].expand(b, -1)
            self.joint_extra = {'attn_weights': torch.cat([w, torch.ones_like(w)])}   # (2B, Lc): cond rows only

    def __call__(self, x, t, i):
        """Logits (B, C, H, W) for tokens x (B, H, W) at noise levels t (B,), step i."""
        if self.cfgs is None or i >= self.conditional_steps:
            return self.model(x, t, **self.cond, **self.extra).float()
        if self.joint is not None:
            cond, uncond = self.model(torch.cat([x, x]), torch.cat([t, t]), **self.joint, **self.joint_extra).chunk(2)
        else:
            cond, uncond = self.model(x, t, **self.cond, **self.extra), self.model(x, t, **self.uncond)
        return _guide(cond, uncond, self.cfgs[i].item(), exact=self.exact)

    def critic(self, x, t):
        """The model's noise-detection logits (B, H, W) for tokens x at levels t: the conditional branch
        alone (the head judges whether a token fits the picture the prompt asks for)."""
        return self.model(x, t, **self.cond, **self.extra, critic=True)[1].float()


def v3_attn_weights(text_length, text_weight=1.2, image_weight=0.4):
    """The published demo's weights: a vector as long as the ByT5 sequence L, applied to the last L
    conditioning keys, whose last 4 (the image-embedding tokens) get ``image_weight``."""
    w = torch.full((text_length,), float(text_weight))
    w[-4:] = image_weight
    return w


class RegionalModel:
    """Wraps a Paella model so that a ``regions`` input (R, 1, 1, H, W) of blend weights makes one forward
    over R stacked conditions (inputs of batch R*B, region-major) and blends their logits; without
    ``regions`` (the unconditional branch) it is the model itself. With ``critic=True`` the noise-detection
    logits are blended by the same weights (the model's head, if it has one, serves the 'critic' rule)."""

    def __init__(self, model):
        self.model, self.num_labels = model, model.num_labels
        self.critic = getattr(model, 'critic', None)

    def __call__(self, x, r, regions=None, critic=False, **inputs):
        head = {'critic': True} if critic else {}
        if regions is None:
            return self.model(x, r, **inputs, **head)
        n = regions.shape[0]
        out = self.model(x.repeat(n, 1, 1), r.repeat(n), **inputs, **head)      # (R*B, C, H, W) [, (R*B, H, W)]
        logits, noise = out if critic else (out, None)
        logits = (logits.unflatten(0, (n, -1)) * regions.to(logits.dtype)).sum(0)              # (B, C, H, W)
        if not critic:
            return logits
        return logits, (noise.unflatten(0, (n, -1)) * regions[:, :, 0].to(noise.dtype)).sum(0)  # (B, H, W)
