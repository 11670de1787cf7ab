"""The f4 VQGAN of Paella v3: images in [0, 1] (B, 3, H, W) <-> token ids (B, H/4, W/4); with
`VQConfig.sr_levels` super-resolving stages, H/16 with two.

Names and arithmetic follow the published ``VQModel`` (and the ``VectorQuantize`` layer it imports), so
``vqgan_f4.pt`` loads strictly and produces the same token ids.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Pretrained
from .noise import check_token_range


@dataclass
class VQConfig:
    """Constructor arguments of `VQModel`; the defaults are the published f4 VQGAN (8192 codes of 4 dims)."""
    levels: int = 2                 # each level halves the resolution; with the pixel unshuffle, f = 2^levels
    bottleneck_blocks: int = 12     # decoder blocks at the lowest resolution
    decoder_blocks: int = 1         # decoder blocks at each higher resolution (after its upsampling)
    c_hidden: int = 384             # channels at the lowest resolution
    c_latent: int = 4               # dimension of a code
    codebook_size: int = 8192
    scale_factor: float = 0.3764    # latents are divided by this for the generator's convenience
    sr_levels: int = 0              # super-resolving stages: each doubles the decoded size, and the encoder
                                    # reads the image averaged down by as much (0: the published model)
    c_sr: int = 32                  # channels of the first super-resolving stage, halved at each next one


PRESETS = {
    'f4': {},                                                   # the published VQGAN, 18,406,894 parameters
    'small': dict(bottleneck_blocks=4, c_hidden=128, codebook_size=1024),
    'tiny': dict(bottleneck_blocks=2, c_hidden=32, codebook_size=64),
}


def nearest_code(x, codebook):
    """Index (N,) of the nearest codebook row (K, D) for every row of x (N, D), by squared distance."""
    dist = torch.addmm((codebook ** 2).sum(1) + (x ** 2).sum(1, keepdim=True), x, codebook.t(),
                       alpha=-2.0, beta=1.0)                    # (N, K); the published formula, same ties
    return dist.argmin(dim=1)


class VectorQuantize(nn.Module):
    """Nearest-neighbour quantiser with a straight-through gradient; the codebook is ``codebook.weight``."""

    def __init__(self, embedding_size, k):
        super().__init__()
        self.codebook = nn.Embedding(k, embedding_size)
        self.codebook.weight.data.uniform_(-1.0 / k, 1.0 / k)

    def idx2vq(self, idx, dim=-1):
        q = self.codebook(idx)
        return q.movedim(-1, dim) if dim != -1 else q

    def forward(self, x, dim=-1):
        """Returns (quantized like x, (vq_loss, commit_loss), indices of shape x without dim)."""
        x = x.movedim(dim, -1) if dim != -1 else x
        z_e = x.reshape(-1, x.size(-1))                          # (N, D)
        indices = nearest_code(z_e.detach(), self.codebook.weight.detach())
        z_q = self.codebook.weight.index_select(0, indices)      # graded towards the codebook
        vq_loss = (z_q - z_e.detach()).pow(2).mean()
        commit_loss = (z_e - z_q.detach()).pow(2).mean()
        # Straight-through: the value is exactly the code (z_e - z_e is +0), the gradient goes to z_e.
        out = z_q.detach() + (z_e - z_e.detach())
        out = out.view(x.shape)
        out = out.movedim(-1, dim) if dim != -1 else out
        return out, (vq_loss, commit_loss), indices.view(x.shape[:-1])


class ResBlock(nn.Module):
    """Depthwise + channel MLP block with six learned modulation scalars (all zero at init)."""

    def __init__(self, c, c_hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _norm(x, norm):
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x):
        g = self.gammas
        x = x + self.depthwise(self._norm(x, self.norm1) * (1 + g[0]) + g[1]) * g[2]
        h = (self._norm(x, self.norm2) * (1 + g[3]) + g[4]).permute(0, 2, 3, 1)     # (B, H, W, C)
        return x + self.channelwise(h).permute(0, 3, 1, 2) * g[5]


class VQModel(Pretrained, nn.Module, config_class=VQConfig, presets=PRESETS, default_preset='f4',
              model_type='vqgan'):
    """``VQModel()`` is the published f4 VQGAN. Images are (B, 3, H, W) in [0, 1], H and W multiples of
    `downsampling` (4; 16 with two super-resolving stages)."""

    def __init__(self, config: VQConfig | None = None, **kwargs):
        super().__init__()
        cfg = self.configure(config, kwargs)
        self.c_latent, self.scale_factor, self.codebook_size = cfg.c_latent, cfg.scale_factor, cfg.codebook_size
        c_levels = [cfg.c_hidden // 2 ** i for i in reversed(range(cfg.levels))]

        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, c_levels[0], kernel_size=1))
        down = []
        for i in range(cfg.levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c_levels[i], kernel_size=4, stride=2, padding=1))
            down.append(ResBlock(c_levels[i], c_levels[i] * 4))
        down.append(nn.Sequential(nn.Conv2d(c_levels[-1], cfg.c_latent, kernel_size=1, bias=False),
                                  nn.BatchNorm2d(cfg.c_latent)))   # latents normalised to mean 0, std 1
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = VectorQuantize(cfg.c_latent, k=cfg.codebook_size)

        up = [nn.Sequential(nn.Conv2d(cfg.c_latent, c_levels[-1], kernel_size=1))]
        for i in range(cfg.levels):
            c = c_levels[cfg.levels - 1 - i]
            up += [ResBlock(c, c * 4) for _ in range(cfg.bottleneck_blocks if i == 0 else cfg.decoder_blocks)]
            if i < cfg.levels - 1:
                up.append(nn.ConvTranspose2d(c, c_levels[cfg.levels - 2 - i], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], 3 * 4, kernel_size=1), nn.PixelShuffle(2))
        if cfg.sr_levels:
            # The native image upsampled bilinearly, plus detail drawn from the decoder's last features: the
            # detail's last layer starts at zero, so a new model first draws the upsampled native image.
            c_sr = [max(cfg.c_sr // 2 ** i, 4) for i in range(cfg.sr_levels)]
            sr = []
            for i, c in enumerate(c_sr):
                sr += [nn.ConvTranspose2d(c_levels[0] if i == 0 else c_sr[i - 1], c, kernel_size=4, stride=2,
                                          padding=1), ResBlock(c, c * 4)]
            self.sr_blocks = nn.Sequential(*sr)
            self.sr_out = nn.Sequential(nn.Conv2d(c_sr[-1], 3 * 4, kernel_size=1), nn.PixelShuffle(2))
            nn.init.zeros_(self.sr_out[0].weight)
            nn.init.zeros_(self.sr_out[0].bias)

    @property
    def downsampling(self):
        """Image pixels per token a side: 4 for the published model, 16 with two super-resolving stages."""
        return 2 ** (self.config.levels + self.config.sr_levels)

    @property
    def native_downsampling(self):
        """Pixels per token without the super-resolving stages (`decode_indices(native=True)`)."""
        return 2 ** self.config.levels

    def _check_images(self, x, native=False):
        f = self.native_downsampling if native else self.downsampling
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be a float tensor (B, 3, H, W) in [0, 1], "
                             f"got {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is not divisible by the VQGAN's factor {f}")

    def _check_indices(self, idx):
        if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.dim() != 3:
            raise ValueError(f"token ids must be an integer tensor (B, H, W), got "
                             f"{getattr(idx, 'dtype', type(idx))} {tuple(getattr(idx, 'shape', ()))}")
        check_token_range(idx, self.codebook_size)

    def _encode(self, x, native=False):
        """(quantized, latent, indices (B, h, w), (codebook loss, commitment loss)), unscaled."""
        self._check_images(x, native)
        if self.config.sr_levels and not native:                 # the encoder reads the native size
            x = F.avg_pool2d(x, 2 ** self.config.sr_levels)
        x = self.down_blocks(self.in_block(x))                   # (B, c_latent, h, w)
        qe, losses, indices = self.vquantizer(x, dim=1)
        return qe, x, indices, losses

    def encode(self, x):
        """Published interface: (quantized / scale, latent / scale, indices (B, h, w), vq loss), the vq loss
        being the codebook loss + 0.25 x the commitment loss."""
        qe, latent, indices, (codebook, commitment) = self._encode(x)
        return qe / self.scale_factor, latent / self.scale_factor, indices, codebook + commitment * 0.25

    def encode_indices(self, x, native=False):
        """Token ids (B, H/f, W/f) of images in [0, 1], f = `downsampling` (``native``: images at the native
        size, f = `native_downsampling`)."""
        return self._encode(x, native)[2]

    def _draw(self, h, native):
        """Images from the decoder's last features h (B, c, H/2, W/2): at the native size (f4), or through
        the super-resolving stages when there are some and ``native`` is False."""
        image = self.out_block(h)                                                # (B, 3, H, W)
        if not self.config.sr_levels or native:
            return image
        up = F.interpolate(image, scale_factor=2 ** self.config.sr_levels, mode='bilinear', align_corners=False)
        return up + self.sr_out(self.sr_blocks(h))                               # (B, 3, H * 2^sr, W * 2^sr)

    def decode(self, latent, native=False):
        """Images from (scaled) latents (B, c_latent, h, w); ``native``: at 4 pixels a token, without the
        super-resolving stages."""
        return self._draw(self.up_blocks(latent * self.scale_factor), native)

    def decode_indices(self, idx, native=False):
        """Images (B, 3, f h, f w) with f = `downsampling`, roughly in [0, 1] (clamp before saving), from token
        ids (B, h, w); ``native``: f = 4, without the super-resolving stages."""
        self._check_indices(idx)
        return self._draw(self.up_blocks(self.vquantizer.idx2vq(idx.long(), dim=1)), native)

    def forward(self, x=None, details=False, indices=None):
        """(reconstruction, VQ loss) as published. With ``details``: (reconstruction, (codebook loss,
        commitment loss), indices, latent / scale), so that a trainer weights the two parts itself. With
        ``indices`` (B, h, w) instead of images: their decoding alone (training the decoder on given tokens)."""
        if indices is not None:
            return self.decode_indices(indices)
        qe, latent, indices, (codebook, commitment) = self._encode(x)
        recon = self.decode(qe / self.scale_factor)
        if details:
            return recon, (codebook, commitment), indices, latent / self.scale_factor
        return recon, codebook + commitment * 0.25
