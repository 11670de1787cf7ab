"""The Paella generator: a convolutional U-Net over a grid of VQGAN tokens.

Tokens (B, H, W) are embedded, patchified and passed through levels of ConvNeXt-style blocks (C),
noise-level modulation (T) and cross-attention to a conditioning sequence (A). The network predicts,
for every position, logits over the codebook: (B, num_labels, H, W).

Module and parameter names follow the published Paella v3 code exactly, so an official state dict
loads with ``load_state_dict(sd, strict=True)``.
"""
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Attention, AttnBlock, FeedForwardBlock, GlobalResponseNorm, LayerNorm2d, ResBlock, TimestepBlock
from .checkpoint import Pretrained
from .noise import add_noise, loss_weight, r_embedding


@dataclass
class PaellaConfig:
    """Constructor arguments of `Paella`; the defaults are the published ones."""
    c_in: int = 256                 # token embedding width
    c_out: int = 256                # width before the final projection onto the codebook
    num_labels: int = 8192          # codebook size of the VQGAN
    c_r: int = 64                   # width of the sinusoidal noise-level embedding
    patch_size: int = 2
    c_cond: int = 1024              # width of the conditioning sequence
    c_hidden: list = field(default_factory=lambda: [640, 1280, 1280])
    nhead: list = field(default_factory=lambda: [-1, 16, 16])
    blocks: list = field(default_factory=lambda: [6, 16, 6])
    level_config: list = field(default_factory=lambda: ['CT', 'CTA', 'CTA'])
    clip_embd: int = 1024
    byt5_embd: int = 1536
    clip_seq_len: int = 4           # tokens each CLIP vector is expanded to
    kernel_size: int = 3
    dropout: float | list = 0.1
    self_attn: bool = True          # attention keys include the image positions themselves
    pooled_text: bool = False       # without a CLIP text embedding, feed clip_mapper the text states' mean
                                    # (L2-normalised: MiniLM's sentence embedding); needs clip_embd == byt5_embd
    critic: bool = False            # a noise-detection head: one logit per position, "this input token was
                                    # replaced by noise" (Token-Critic's question; the `critic` re-noising rule)


# Size presets: keyword arguments over the published defaults.
PRESETS = {
    # The published Paella v3: 1,008,350,592 parameters, ByT5-XL (2560 wide) + CLIP-H (1024 wide).
    'v3': dict(byt5_embd=2560),
    # 115,015,872 parameters; the size the performance issue benchmarks at 32x32 tokens.
    'base': dict(c_hidden=[320, 640, 640], nhead=[-1, 10, 10], blocks=[2, 6, 2], byt5_embd=2560),
    # 13,383,296 parameters: a layout that trains on a CPU (1024 codes, 384-wide MiniLM token states).
    'small': dict(c_in=128, c_out=128, num_labels=1024, c_r=64, c_cond=256, c_hidden=[128, 256, 256],
                  nhead=[-1, 4, 4], blocks=[2, 4, 2], clip_embd=384, byt5_embd=384, dropout=0.1),
    # 412,672 parameters (the fixture's size), for tests.
    'tiny': dict(c_in=16, c_out=16, num_labels=64, c_r=16, c_cond=32, c_hidden=[32, 64, 64],
                 nhead=[-1, 2, 2], blocks=[1, 2, 1], clip_embd=16, byt5_embd=24),
}


def text_pool(states):
    """(B, L, D) text states, zero at padding -> (B, D) L2-normalised mean of the real tokens: for MiniLM
    exactly the sentence embedding it was trained to give (paraphrases land near each other)."""
    real = (states != 0).any(-1, keepdim=True).to(states.dtype)                 # (B, L, 1)
    mean = (states * real).sum(1) / real.sum(1).clamp(min=1)
    return F.normalize(mean.float(), dim=-1).to(states.dtype)


class Paella(Pretrained, nn.Module, config_class=PaellaConfig, presets=PRESETS, default_preset='v3',
             model_type='paella'):
    """The Paella U-Net. ``Paella(byt5_embd=2560)`` is the published v3 model.

    forward(x, r, byt5, clip=None, clip_image=None) -> logits (B, num_labels, H, W), where
    x: tokens (B, H, W), r: noise level in [0, 1] (B,), byt5: text hidden states (B, L, byt5_embd),
    clip / clip_image: CLIP text / image embeddings (B, clip_embd) or None; with ``pooled_text`` a missing
    clip is the pooled text (`text_pool`).
    """

    def __init__(self, config: PaellaConfig | None = None, **kwargs):
        super().__init__()
        cfg = self.configure(config, kwargs)
        self.c_r, self.c_cond, self.num_labels = cfg.c_r, cfg.c_cond, cfg.num_labels
        levels = len(cfg.c_hidden)
        for name in ('nhead', 'blocks', 'level_config'):
            if len(getattr(cfg, name)) != levels:
                raise ValueError(f"{name} has {len(getattr(cfg, name))} entries but c_hidden has {levels}")
        if cfg.pooled_text and cfg.clip_embd != cfg.byt5_embd:
            raise ValueError(f"pooled_text feeds the text states' mean to clip_mapper: clip_embd ({cfg.clip_embd}) "
                             f"must equal byt5_embd ({cfg.byt5_embd})")
        dropout = cfg.dropout if isinstance(cfg.dropout, (list, tuple)) else [cfg.dropout] * levels
        c_hidden = cfg.c_hidden

        # Conditioning: ByT5 states (B, L, byt5_embd) and CLIP vectors become a (B, Lc, c_cond) sequence.
        self.byt5_mapper = nn.Linear(cfg.byt5_embd, cfg.c_cond)
        self.clip_mapper = nn.Linear(cfg.clip_embd, cfg.c_cond * cfg.clip_seq_len)
        self.clip_image_mapper = nn.Linear(cfg.clip_embd, cfg.c_cond * cfg.clip_seq_len)
        self.seq_norm = nn.LayerNorm(cfg.c_cond, elementwise_affine=False, eps=1e-6)

        self.in_mapper = nn.Sequential(nn.Embedding(cfg.num_labels, cfg.c_in),
                                       nn.LayerNorm(cfg.c_in, elementwise_affine=False, eps=1e-6))
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(cfg.patch_size),
            nn.Conv2d(cfg.c_in * cfg.patch_size ** 2, c_hidden[0], kernel_size=1),
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6))

        def get_block(block_type, c, nhead, c_skip=0, dropout=0.0):
            if block_type == 'C':
                return ResBlock(c, c_skip, kernel_size=cfg.kernel_size, dropout=dropout)
            if block_type == 'A':
                return AttnBlock(c, cfg.c_cond, nhead, self_attn=cfg.self_attn, dropout=dropout)
            if block_type == 'F':
                return FeedForwardBlock(c, dropout=dropout)
            if block_type == 'T':
                return TimestepBlock(c, cfg.c_r)
            raise ValueError(f"block type {block_type!r} is not one of 'C', 'A', 'F', 'T'")

        self.down_blocks = nn.ModuleList()
        for i in range(levels):
            level = nn.ModuleList()
            if i > 0:
                level.append(nn.Sequential(LayerNorm2d(c_hidden[i - 1], elementwise_affine=False, eps=1e-6),
                                           nn.Conv2d(c_hidden[i - 1], c_hidden[i], kernel_size=2, stride=2)))
            for _ in range(cfg.blocks[i]):
                for block_type in cfg.level_config[i]:
                    level.append(get_block(block_type, c_hidden[i], cfg.nhead[i], dropout=dropout[i]))
            self.down_blocks.append(level)

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            level = nn.ModuleList()
            for j in range(cfg.blocks[i]):
                for k, block_type in enumerate(cfg.level_config[i]):
                    # The first block of every level but the deepest takes the skip connection.
                    c_skip = c_hidden[i] if i < levels - 1 and j == k == 0 else 0
                    level.append(get_block(block_type, c_hidden[i], cfg.nhead[i], c_skip=c_skip,
                                           dropout=dropout[i]))
            if i > 0:
                level.append(nn.Sequential(
                    LayerNorm2d(c_hidden[i], elementwise_affine=False, eps=1e-6),
                    nn.ConvTranspose2d(c_hidden[i], c_hidden[i - 1], kernel_size=2, stride=2)))
            self.up_blocks.append(level)

        self.clf = nn.Sequential(
            LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
            nn.Conv2d(c_hidden[0], cfg.c_out * cfg.patch_size ** 2, kernel_size=1),
            nn.PixelShuffle(cfg.patch_size))
        self.out_mapper = nn.Sequential(
            LayerNorm2d(cfg.c_out, elementwise_affine=False, eps=1e-6),
            nn.Conv2d(cfg.c_out, cfg.num_labels, kernel_size=1, bias=False))
        # 1x1 on the normalised last features (B, c_out, H, W) -> (B, 1, H, W); absent from published models
        self.critic = nn.Conv2d(cfg.c_out, 1, kernel_size=1) if cfg.critic else None
        self.out_mapper_published = False
        self._init_weights()

    def _init_weights(self):
        """The published initialisation (matters for training from scratch, not for loading)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for mapper in (self.byt5_mapper, self.clip_mapper, self.clip_image_mapper):
            nn.init.normal_(mapper.weight, std=0.02)
        nn.init.xavier_uniform_(self.embedding[1].weight, 0.02)
        nn.init.zeros_(self.clf[1].weight)
        nn.init.normal_(self.in_mapper[0].weight, std=math.sqrt(1 / self.num_labels))
        # Output projection starts tied (as a copy) to the token embedding.
        self.out_mapper[-1].weight.data = self.in_mapper[0].weight.data[:, :, None, None].clone()
        for level in list(self.down_blocks) + list(self.up_blocks):
            for block in level:
                if isinstance(block, (ResBlock, FeedForwardBlock)):
                    block.channelwise[-1].weight.data *= math.sqrt(1 / sum(self.config.blocks))
                elif isinstance(block, TimestepBlock):
                    nn.init.zeros_(block.mapper.weight)

    @property
    def downsampling(self):
        """Factor by which the token grid shrinks at the deepest level; H and W must be multiples."""
        return self.config.patch_size * 2 ** (len(self.config.c_hidden) - 1)

    def gen_r_embedding(self, r, max_positions=10000):
        return r_embedding(r, self.c_r, max_positions)

    def gen_c_embeddings(self, byt5, clip=None, clip_image=None):
        """Conditioning sequence (B, L + 4 [clip] + 4 per clip_image, c_cond). ``clip_image`` may be a list
        of embeddings (B, clip_embd), each its own 4 tokens, in order (the published demo's variations of
        several images)."""
        seq = self.byt5_mapper(byt5)
        if clip is None and self.config.pooled_text:
            clip = text_pool(byt5)
        images = clip_image if isinstance(clip_image, (list, tuple)) else [clip_image]
        for vec, mapper in ((clip, self.clip_mapper), *((v, self.clip_image_mapper) for v in images)):
            if vec is not None:
                seq = torch.cat([seq, mapper(vec).view(vec.size(0), -1, self.c_cond)], dim=1)
        return self.seq_norm(seq)

    def check_inputs(self, x, r, byt5, clip=None, clip_image=None, batch=None):
        """Raise ValueError naming the problem, before it becomes a shape error deep inside. x and r may be
        None (conditioning alone, `prepare`); byt5 may be None with ``batch`` (the cache's batch size).
        Shapes and dtypes only: reading token values back would stop a GPU at every step
        (`noise.check_token_range` does that once per sampling call and once per training run)."""
        cfg = self.config
        if x is not None:
            if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise ValueError(f"tokens must be an integer tensor (B, H, W), got {getattr(x, 'dtype', type(x))}")
            if x.dim() != 3:
                raise ValueError(f"tokens must have shape (B, H, W), got {tuple(x.shape)}")
            b, h, w = x.shape
            if h % self.downsampling or w % self.downsampling:
                raise ValueError(f"token grid {h}x{w} is not divisible by the U-Net's total downsampling "
                                 f"{self.downsampling} (patch_size {cfg.patch_size} x 2^{len(cfg.c_hidden) - 1})")
            if not isinstance(r, torch.Tensor) or r.shape != (b,):
                raise ValueError(f"noise level r must have shape ({b},), got {tuple(getattr(r, 'shape', ()))}")
        else:
            b = byt5.shape[0] if isinstance(byt5, torch.Tensor) and byt5.dim() == 3 else None
        if byt5 is None and batch is not None:
            if batch != b:
                raise ValueError(f"the conditioning cache is for a batch of {batch}, the tokens are {b}")
            return
        if byt5 is None or byt5.dim() != 3 or byt5.shape[0] != b or byt5.shape[2] != cfg.byt5_embd:
            raise ValueError(f"text conditioning must have shape ({b or 'B'}, L, {cfg.byt5_embd}), "
                             f"got {None if byt5 is None else tuple(byt5.shape)}")
        images = list(clip_image) if isinstance(clip_image, (list, tuple)) else [clip_image]
        for name, vec in (('clip', clip), *(('clip_image', v) for v in images)):
            if vec is not None and (not isinstance(vec, torch.Tensor) or vec.shape != (b, cfg.clip_embd)):
                raise ValueError(f"{name} embedding must have shape ({b}, {cfg.clip_embd}), "
                                 f"got {tuple(getattr(vec, 'shape', ()))}")

    def _blocks(self, level, x, r_embed, c_embed, skip=None, key_weights=None, cached=None):
        for j, block in enumerate(level):
            if isinstance(block, ResBlock):
                x = block(x, skip if j == 0 else None)
            elif isinstance(block, AttnBlock):
                x = block(x, c_embed, key_weights, None if cached is None else next(cached))
            elif isinstance(block, TimestepBlock):
                x = block(x, r_embed)
            else:
                x = block(x)
        return x

    def prepare(self, byt5, clip=None, clip_image=None):
        """The conditioning's keys and values for every attention block: they do not change over the
        steps of a sampling run, so `sample(..., cache=True)` computes them once and calls
        ``model(x, r, cache=...)``. Returns {'cache': [(k, v), ...]} in the blocks' order."""
        self.check_inputs(None, None, byt5, clip, clip_image)
        c_embed = self.gen_c_embeddings(byt5, clip, clip_image)     # (B, Lc, c_cond)
        return {'cache': [m.cond_kv(c_embed) for m in self.modules() if isinstance(m, AttnBlock)]}

    def forward(self, x, r, byt5=None, clip=None, clip_image=None, attn_weights=None, cache=None, critic=False):
        """attn_weights (Lc,) or (B, Lc): factors for the attention probabilities of the last Lc
        conditioning keys. cache: from `prepare`, instead of byt5 / clip / clip_image. critic: return
        (logits, noise logits (B, H, W)), the head's "this input token is noise" (needs ``config.critic``)."""
        if critic and self.critic is None:
            raise ValueError("this model has no noise-detection head (config.critic is False)")
        if cache is None:
            self.check_inputs(x, r, byt5, clip, clip_image)
            c_embed, cached = self.gen_c_embeddings(byt5, clip, clip_image), None     # (B, Lc, c_cond)
        else:
            self.check_inputs(x, r, None, batch=cache[0][0].shape[0] if cache else None)
            c_embed, cached = None, iter(cache)
        r_embed = self.gen_r_embedding(r).to(self.byt5_mapper.weight.dtype)     # (B, c_r)
        x = self.embedding(self.in_mapper(x.long()).permute(0, 3, 1, 2))   # (B, c_hidden[0], H/p, W/p)
        level_outputs = []
        for level in self.down_blocks:
            x = self._blocks(level, x, r_embed, c_embed, key_weights=attn_weights, cached=cached)
            level_outputs.insert(0, x)
        x = level_outputs[0]
        for i, level in enumerate(self.up_blocks):
            x = self._blocks(level, x, r_embed, c_embed, skip=level_outputs[i] if i > 0 else None,
                             key_weights=attn_weights, cached=cached)
        x = self.clf(x)                                             # (B, c_out, H, W)
        if critic:
            return self.logits(x), self.critic(self.out_mapper[0](x))[:, 0]
        return self.logits(x)                                       # (B, num_labels, H, W)

    def logits(self, x):
        """out_mapper (LayerNorm2d + 1x1 conv) as published; else as a linear layer on channels-last
        features, which returns (B, num_labels, H, W) with channels-last memory: the sampler's categorical
        step reads codes of a position contiguously, with no permuted copy of the largest tensor."""
        norm, conv = self.out_mapper
        if self.out_mapper_published:
            return self.out_mapper(x)
        x = F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, eps=norm.eps)   # (B, H, W, c_out)
        return F.linear(x, conv.weight.flatten(1)).permute(0, 3, 1, 2)

    def set_published_math(self, published=False):
        """True: compute attention as nn.MultiheadAttention does (explicit softmax, no fused kernel) and the
        response norm with torch.norm, as the published code; False (default): the faster equivalents."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fused = not published
            elif isinstance(m, GlobalResponseNorm):
                m.published = published
        self.out_mapper_published = published
        return self

    def add_noise(self, x, t, mask=None, random_x=None, generator=None):
        return add_noise(x, t, self.num_labels, mask=mask, random_x=random_x, generator=generator)

    def get_loss_weight(self, t, mask, min_val=0.3):
        return loss_weight(t, mask, min_val)

    def config_dict(self):
        return asdict(self.config)
