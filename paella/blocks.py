"""The U-Net's building blocks, in the published Paella v3 layout (names and parameters unchanged, so an
official state dict loads strictly): ConvNeXt-style residual blocks with global response normalisation (C),
noise-level modulation (T), and attention to the conditioning sequence (A).

Shapes: images of features are (B, C, H, W); sequences (B, L, C).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

TINY = torch.finfo(torch.float32).tiny

# Training sets this (paella.train.distributed.SampleDropout): a callable (x, p) -> x with its dropped
# elements zeroed and the others scaled by 1 / (1 - p), whose masks are a function of each sample's
# position in the global batch, so a batch split over N processes drops what one process drops. None:
# torch's dropout, drawn from the global generator.
mask_source = None


def dropout(x, p, training=True):
    """Dropout of x (B, ...) through `mask_source` where one is set."""
    if not training or not p:
        return x
    return F.dropout(x, p, True) if mask_source is None else mask_source(x, p)


class Dropout(nn.Dropout):
    """nn.Dropout (the same name in the layout, no parameters) through `dropout`."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) tensor."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 global response normalisation on channels-last (B, H, W, C) input.

    The L2 norm over H and W is a sum of squares: on CPUs ``torch.norm`` over two non-last dimensions was
    16x slower than this and a quarter of a small model's time (``published = True``: torch.norm).
    """

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.published = False

    def forward(self, x):
        if self.published:
            gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)                  # (B, 1, 1, C)
        else:
            # clamped: at a channel that is 0 everywhere sqrt's gradient is inf (0 x inf = NaN); torch.norm's is 0
            gx = x.square().sum((1, 2), keepdim=True, dtype=torch.float32).clamp_min(TINY).sqrt().to(x.dtype)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


def _channel_mlp(c, dropout):
    return nn.Sequential(nn.Linear(c, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), Dropout(dropout),
                         nn.Linear(c * 4, c))


class ResBlock(nn.Module):
    """Depthwise conv + channel MLP; the first block of an up level also takes the skip connection."""

    def __init__(self, c, c_skip=0, kernel_size=3, dropout=0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c + c_skip, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = _channel_mlp(c, dropout)

    def forward(self, x, x_skip=None):
        x_res = x
        if x_skip is not None:
            x = torch.cat([x, x_skip], dim=1)
        x = self.norm(self.depthwise(x)).permute(0, 2, 3, 1)    # (B, H, W, C)
        return self.channelwise(x).permute(0, 3, 1, 2) + x_res


class Attention(nn.Module):
    """Multi-head attention with the parameters of ``nn.MultiheadAttention`` (in_proj_weight,
    in_proj_bias, out_proj) computed through ``scaled_dot_product_attention`` (``fused = False``: the
    explicit softmax(q k^T / sqrt(d)) v of the published module, for reference timings).

    ``key_weights`` (Lc,) or (B, Lc) multiplies the attention probabilities of the last Lc keys after the
    softmax (not renormalised), as the published v3 demo does. Because the factor depends on the key alone,
    scaling the values of those keys is the same product and keeps the fused kernel.
    """

    def __init__(self, c, nhead, dropout=0.0):
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout = c, nhead, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * c, c))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * c))
        self.out_proj = nn.Linear(c, c)
        self.fused = True
        nn.init.xavier_uniform_(self.in_proj_weight)

    def project_kv(self, kv):
        """Keys and values (B, L, C) each of a key sequence kv (B, L, C)."""
        c = self.embed_dim
        return F.linear(kv, self.in_proj_weight[c:], self.in_proj_bias[c:]).unflatten(-1, (2, c)).unbind(-2)

    def forward(self, x, kv=None, key_weights=None, cached=None):
        """x (B, Lq, C) attends to kv (B, Lk, C), then to the (keys, values) ``cached`` from `project_kv`
        of a conditioning sequence (the same projections, computed once for every sampling step)."""
        b, lq, c = x.shape
        q = F.linear(x, self.in_proj_weight[:c], self.in_proj_bias[:c])   # (B, Lq, C)
        parts = ([self.project_kv(kv)] if kv is not None else []) + ([cached] if cached is not None else [])
        k, v = (torch.cat(t, dim=1) if len(t) > 1 else t[0] for t in zip(*parts))   # (B, Lk, C) each
        if key_weights is not None:
            w = key_weights if key_weights.dim() == 2 else key_weights[None].expand(b, -1)   # (B, Lc)
            w = torch.cat([w.new_ones(b, k.shape[1] - w.shape[1]), w], dim=1)
            v = (v.float() * w[:, :, None].float()).to(v.dtype) if v.dtype != w.dtype else v * w[:, :, None]
        def heads(t):
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)   # (B, nh, L, C/nh)
        q, k, v = heads(q), heads(k), heads(v)
        p = self.dropout if self.training else 0.0
        if self.fused and not (p and mask_source is not None):    # the fused kernel draws its own masks
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:                                                      # probabilities (B, nh, Lq, Lk)
            o = dropout((q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1), p) @ v
        return self.out_proj(o.transpose(1, 2).reshape(b, lq, c))


class Attention2D(nn.Module):
    def __init__(self, c, nhead, dropout=0.0):
        super().__init__()
        self.attn = Attention(c, nhead, dropout)

    def forward(self, x, cached, self_attn=False, key_weights=None):
        """x (B, C, H, W) attends to itself (self_attn) and to the conditioning keys/values ``cached``."""
        b, c, h, w = x.shape
        x = x.view(b, c, h * w).permute(0, 2, 1)                   # (B, HW, C)
        x = self.attn(x, x if self_attn else None, key_weights, cached)
        return x.permute(0, 2, 1).reshape(b, c, h, w)


class AttnBlock(nn.Module):
    def __init__(self, c, c_cond, nhead, self_attn=True, dropout=0.0):
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.attention = Attention2D(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def cond_kv(self, c_embed):
        """This block's keys and values (B, Lc, C) each of the conditioning sequence (B, Lc, c_cond)."""
        return self.attention.attn.project_kv(self.kv_mapper(c_embed))

    def forward(self, x, c_embed=None, key_weights=None, cached=None):
        cached = self.cond_kv(c_embed) if cached is None else cached
        return x + self.attention(self.norm(x), cached, self_attn=self.self_attn, key_weights=key_weights)


class FeedForwardBlock(nn.Module):
    def __init__(self, c, dropout=0.0):
        super().__init__()
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = _channel_mlp(c, dropout)

    def forward(self, x):
        return x + self.channelwise(self.norm(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TimestepBlock(nn.Module):
    """Scale and shift every channel from the noise-level embedding."""

    def __init__(self, c, c_timestep):
        super().__init__()
        self.mapper = nn.Linear(c_timestep, c * 2)

    def forward(self, x, t):
        a, b = self.mapper(t)[:, :, None, None].chunk(2, dim=1)   # (B, C, 1, 1) each
        return x * (1 + a) + b
