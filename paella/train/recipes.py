"""The three things `paella train` can train, each a config (its own settings over `TrainConfig`) and a
task: it builds ``model`` and ``dataset``, computes the ``loss`` of a micro-batch, and may do work after
each optimizer step and keep state in checkpoints.

Every random draw of a step comes from ``s`` (a `distributed.Slice`): drawn for the whole global batch
and sliced for this process, so a run split over more processes computes the same step.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..data import ImageFolder, Preencoded, is_shards, webdataset_images
from ..model import Paella, text_pool
from ..noise import add_noise, check_token_range, loss_weight
from ..prior import CosineSchedule, PriorModel
from ..shards import preencoded_extras
from ..vq import VQModel
from .config import TrainConfig
from .distributed import gather_rows, seed_of
from .prepare import crop_pairs


@dataclass
class GeneratorConfig(TrainConfig):
    recipe: ClassVar[str] = 'generator'
    warmup: int = 200               # steps of linear learning-rate warm-up
    vqgan: str = ''                 # on raw images: the frozen VQGAN's folder
    text_encoder: str = 'minilm'    # on raw images: minilm, minilm:<folder> or byt5:<name or folder>
    label_smoothing: float = 0.1    # of the token cross-entropy
    min_loss_weight: float = 0.3    # the loss weight of a token at noise level t is max(t, this)
    p_uncond_text: float = 0.05     # empty prompt instead of the caption, per batch
    p_drop_tokens: float = 0.0      # pooled_text models: the empty prompt's token states but the caption's
                                    # pooled vector, per sample (the model learns to draw from the pooled one)
    p_drop_clip: float = 0.9        # CLIP text embedding of the empty prompt instead of the caption's
    p_drop_clip_image: float = 0.9  # no CLIP image embedding
    critic_weight: float = 0.0      # > 0: train the noise-detection head (--model.critic, implied) with this
                                    # weight on its binary cross-entropy against the positions actually replaced
    samples: ClassVar[bool] = True  # --sample-every draws grids

    def check(self, world):
        super().check(world)
        if Path(self.data).suffix != '.safetensors':
            from ..conditioning import encoder_spec
            if encoder_spec(self.text_encoder) is None:
                raise ValueError("training the generator on images needs a text encoder for the captions: "
                                 "--text-encoder none encodes none")


@dataclass
class VQGANConfig(TrainConfig):
    recipe: ClassVar[str] = 'vqgan'
    weight_decay: float = 0.0       # AdamW's decoupled weight decay
    commit_weight: float = 0.25     # commitment loss weight (moves the encoder's outputs toward their codes)
    l1_weight: float = 1.0          # reconstruction = l1_weight x L1 + MSE (0: MSE alone, what PSNR measures)
    dead_code_every: int = 20       # restart codes unused for this many steps (0: never)
    crop: int = 0                   # token/image pairs: train on a random square of this many tokens a side
                                    # of each pair, and its pixels (0: whole pictures)

    def check(self, world):
        super().check(world)
        for name in ('dead_code_every', 'crop'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 0, got {value!r}")
        if self.crop and not self.data.endswith('.safetensors'):
            raise ValueError("--crop is for token/image pairs (paella restored-pairs); an image folder is "
                             "cropped by --image-size")


@dataclass
class PriorTrainConfig(TrainConfig):
    recipe: ClassVar[str] = 'prior'
    batch_size: int = 64            # global, over all processes and accumulation steps
    grad_clip: float = 5.0          # gradient norm clipped to this
    ema: float = 0.999              # EMA decay of the weights (0: no EMA)
    p_uncond_prior: float = 0.1     # zero text embedding instead of the caption's, per batch


def image_dataset(cfg):
    """An image folder (map-style: exact resume) or webdataset shards (an endless resampled stream)."""
    if is_shards(cfg.data):         # the VQGAN learns from images alone: one without caption is kept
        return webdataset_images(cfg.data, cfg.image_size, seed=cfg.seed, captions=cfg.recipe != 'vqgan',
                                 **cfg.filters)
    return ImageFolder(cfg.data, cfg.image_size, seed=cfg.seed)


def on(device, *tensors):
    return [None if x is None else x.to(device) for x in tensors]


class Task:
    """What every recipe has; ``samples(model, step, out)`` is optional (a grid of samples)."""

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass

    def after_step(self, step, model):
        pass

    def export(self, model, folder, state_dict):
        """Write a model folder of ``state_dict`` (the run's weights or their EMA)."""
        model.save_pretrained(folder, state_dict=state_dict)

    export_file = 'model.safetensors'     # the tensors file `export` writes

    def export_state(self, state_dict):
        """The tensors `export` writes into `export_file` of a run's ``state_dict``."""
        return state_dict

    def exported(self, folder, state_dict):
        """Whether ``folder`` holds what `export` writes of ``state_dict``."""
        try:
            saved = load_file(str(Path(folder) / self.export_file))
        except (OSError, SafetensorError):
            return False
        mine = self.export_state(state_dict)
        return saved.keys() == mine.keys() and all(torch.equal(saved[k], mine[k].cpu()) for k in saved)


class GeneratorTask(Task):
    """Paella's recipe: frozen-VQGAN tokens, t ~ U(0, 1], random-token replacement, weighted cross-entropy."""

    def __init__(self, cfg, device):
        from ..cache import EmbeddingCache
        from ..conditioning import load_text_encoder
        self.cfg, self.device = cfg, device
        file = Path(cfg.data).suffix == '.safetensors'
        if file or (is_shards(cfg.data) and preencoded_extras(cfg.data)[1]):    # paella preencode's output
            self.dataset, self.encoder = Preencoded(cfg.data) if file else image_dataset(cfg), None
            self.uncond = self.dataset.extras.get('uncond_text')                # (1, L, D), as encoded
            width = self.dataset.tensors['text'].shape[-1] if file else self.uncond.shape[-1]
            self.vqgan_path = cfg.vqgan or self.dataset.meta.get('vqgan', '')
        elif not cfg.vqgan:
            raise ValueError("training the generator on images needs --vqgan <VQGAN folder> "
                             "(or pre-encode the data with `paella preencode`)")
        else:
            self.dataset, self.vqgan_path = image_dataset(cfg), cfg.vqgan
            self.encoder = load_text_encoder(self.text_spec(), device)
            self.cache = EmbeddingCache(Path(cfg.out) / 'text-cache')
            self.uncond = self.encoder.encode(['']).states.cpu()
            width = self.encoder.width
        if cfg.sample_every and not self.vqgan_path:
            raise ValueError(f"--sample-every needs the VQGAN to draw the samples: {cfg.data} names none; "
                             "pass --vqgan")
        self.vqgan = None if not self.vqgan_path else \
            VQModel.from_pretrained(self.vqgan_path, device=device, dtype=torch.float32).requires_grad_(False)
        self.preview = None         # raw images and shards: (tokens, text states) of the first batch, to sample
        overrides = dict(cfg.model)
        if self.vqgan is not None:
            overrides.setdefault('num_labels', self.vqgan.codebook_size)
        if cfg.critic_weight > 0 and not overrides.setdefault('critic', True):
            raise ValueError("--critic-weight trains the noise-detection head: --model.critic false has none")
        overrides.setdefault('byt5_embd', width)
        self.model = self.build_model(overrides)
        if 'tokens' in getattr(self.dataset, 'tensors', {}):     # pre-encoded: checked once, not per step
            check_token_range(self.dataset.tensors['tokens'], self.model.num_labels)

    def text_spec(self):
        return self.cfg.text_encoder

    def build_model(self, overrides):
        """The generator to train: the preset's, with ``overrides`` over it (--model.* and the data's widths)."""
        return Paella(Paella.make_config(self.cfg.preset, **overrides))

    def loss(self, model, batch, s):
        cfg = self.cfg
        with torch.no_grad():
            if 'tokens' in batch:
                tokens, text = batch['tokens'].long(), batch['text'].float()
            else:
                # the VQGAN's native size (4 px a token; super-resolving stages only draw)
                tokens = self.vqgan.encode_indices(batch['image'].to(self.device), native=True).cpu()
                text = self.cache.text(self.encoder, batch['caption']).states
            if self.preview is None and cfg.sample_every and s.real:
                self.preview = tokens[:8].clone(), text[:8].clone()                # (n, h, w), (n, L, D)
            u = self.uncond.float()[:, :text.shape[1]]                            # (1, L', D), L' <= L
            u = F.pad(u, (0, 0, 0, text.shape[1] - u.shape[1]))                    # (1, L, D)
            if s.coin(cfg.p_uncond_text):         # the published conditioning dropout: the whole batch
                text = u.expand_as(text)
            clip = batch.get('clip')
            if clip is not None and s.coin(cfg.p_drop_clip):
                clip = self.dataset.extras['uncond_clip'].expand(len(clip), -1)
            elif clip is None and self.model.config.pooled_text:
                clip = text_pool(text)                                              # (b, D)
                drop = (s.rand() < cfg.p_drop_tokens)[:, None, None]                # (b, 1, 1)
                text = torch.where(drop, u, text)
            clip_image = batch.get('clip_image')
            if clip_image is not None and s.coin(cfg.p_drop_clip_image):
                clip_image = None
            b, h, w = tokens.shape
            t = (1 - s.rand()).add(0.001).clamp(0.001, 1.0)                       # (b,) in (0, 1]
            mask = (s.rand(h, w) <= t[:, None, None]).long()                       # (b, h, w): 1 = noised
            noised, mask = add_noise(tokens, t, self.model.num_labels, mask=mask,
                                     random_x=s.randint(self.model.num_labels, h, w))
            weight = loss_weight(t, mask, cfg.min_loss_weight).to(self.device)
        noised, t, text, clip, clip_image, tokens = on(self.device, noised, t, text, clip, clip_image, tokens)
        if cfg.critic_weight <= 0:
            logits = model(noised, t, text, clip, clip_image)                      # (b, K, h, w)
        else:
            logits, noise = model(noised, t, text, clip, clip_image, critic=True)  # and (b, h, w)
        ce = F.cross_entropy(logits.float(), tokens, label_smoothing=cfg.label_smoothing, reduction='none')
        loss = ((ce * weight).sum(dim=(1, 2)) / weight.sum(dim=(1, 2))).mean()
        metrics = {'acc': (logits.argmax(1) == tokens).float().mean().item()}
        if cfg.critic_weight > 0:
            # the label is "differs from the clean token": a replacement that drew the same code is not noise
            bce = F.binary_cross_entropy_with_logits(noise.float(), (noised != tokens).float())
            loss, metrics['critic_bce'] = loss + cfg.critic_weight * bce, bce.item()
        return loss, metrics

    @torch.no_grad()
    def samples(self, model, step, out):
        """A grid of samples for 8 captions above their real tokens: the data's first 8 when pre-encoded,
        else the first 8 of the first batch this process trained on."""
        from ..images import save_images, tokens_to_images
        from ..sampler import sample
        if isinstance(self.dataset, Preencoded):
            n = min(8, len(self.dataset))
            target, text = self.dataset.tensors['tokens'][:n], self.dataset.tensors['text'][:n]
        elif self.preview is not None:
            target, text = self.preview
        else:
            return
        text, target = text.float().to(self.device), target.long().to(self.device)          # (n, L, D), (n, h, w)
        n, (h, w) = len(text), target.shape[1:]
        u = self.uncond.float().to(self.device)[:, :text.shape[1]]
        u = F.pad(u, (0, 0, 0, text.shape[1] - u.shape[1])).expand(n, -1, -1)             # (n, L, D)
        tokens = sample(model, {'byt5': text}, (n, h, w), {'byt5': u}, steps=12, cfg=3.0,
                        generator=torch.Generator(self.device).manual_seed(0))
        save_images(tokens_to_images(self.vqgan, torch.cat([tokens, target])), out / f'samples/{step:07d}.png', True)


class VQTask(Task):
    """Reconstruction (l1_weight x L1 + MSE) + codebook and commitment losses, with dead-code restarts."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.pairs = cfg.data.endswith('.safetensors')
        if cfg.fsdp and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError("--fsdp is for the generator and the prior (the VQGAN is small: plain DDP)")
        if self.pairs:
            # `paella restored-pairs`: given tokens -> their image; the encoder and codebook take no part.
            self.dataset = Preencoded(cfg.data)
            if not {'tokens', 'image'} <= set(self.dataset.tensors):
                raise ValueError(f"{cfg.data} needs 'tokens' and 'image' tensors (paella restored-pairs) "
                                 "to train a VQGAN on it")
            if not cfg.freeze:
                raise ValueError("training on token/image pairs trains the decoder alone: "
                                 "pass --freeze in_block,down_blocks,vquantizer")
        else:
            self.dataset = image_dataset(cfg)
        self.model = VQModel(VQModel.make_config(cfg.preset, **cfg.model))
        # The batch norm after the encoder cancels a per-channel constant of its input, so the last encoder
        # block's output bias has a gradient of exactly 0 in exact arithmetic; Adam would move it by ~lr a
        # step on rounding noise alone (differently for each split of the batch or thread count).
        self.model.down_blocks[-2].channelwise[-1].bias.register_hook(torch.zeros_like)
        self.usage = torch.zeros(self.model.codebook_size, dtype=torch.long)   # (K,) uses since the last restart
        self.latents = None

    def state_dict(self):
        """Code uses since the last restart, counted over every process (a collective: every rank calls it),
        so a resumed run sees the same dead codes; each rank resumes with them (only zeros count)."""
        usage = self.usage.to(self.device)
        if dist.is_initialized():
            dist.all_reduce(usage)
        return {'usage': usage.cpu()}

    def load_state_dict(self, sd):
        self.usage = sd['usage']

    def loss(self, model, batch, s):
        if self.pairs:
            tokens, x = batch['tokens'].long(), batch['image'].float() / 255    # (b, h, w), (b, 3, H, W)
            if self.cfg.crop:
                tokens, x = crop_pairs(tokens, x, self.cfg.crop, s)
            recon = model(indices=tokens.to(self.device))
            x, loss, metrics = x.to(self.device), 0, {}
        else:
            x = batch['image'].to(self.device)
            recon, (codebook, commitment), idx, latent = model(x, details=True)   # through DDP, if any
            # the codebook loss moves the codes toward the encoder's outputs; the commitment loss (weighted)
            # moves the encoder's outputs toward their codes
            loss = codebook + self.cfg.commit_weight * commitment
            counts = torch.bincount(idx.flatten().cpu(), minlength=self.usage.numel())          # (K,)
            latents = (latent * self.model.scale_factor).detach().permute(0, 2, 3, 1).reshape(-1, latent.shape[1])
            if not s.real:    # a placeholder (run to join the collectives alone) uses no code, offers no latent
                counts, latents = counts * 0, latents[:0]
            self.usage += counts
            self.latents = latents            # (b h w, c_latent): the candidates of a dead-code restart
            p = counts.float() / counts.sum()
            metrics = {'used': int((counts > 0).sum()),
                       'perplexity': float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))}
        loss = loss + self.cfg.l1_weight * F.l1_loss(recon.float(), x) + F.mse_loss(recon.float(), x)
        mse = F.mse_loss(recon.detach().float().clamp(0, 1), x)
        return loss, {'psnr': (10 * torch.log10(1 / mse)).item(), **metrics}

    @torch.no_grad()
    def after_step(self, step, model):
        every = self.cfg.dead_code_every
        if not every or (step + 1) % every or not model.vquantizer.codebook.weight.requires_grad:
            return
        usage = self.usage.to(self.device)
        if dist.is_initialized():
            dist.all_reduce(usage)
        codebook = model.vquantizer.codebook.weight
        dead = (usage == 0).nonzero()[:, 0]
        # every process's latents (N, c_latent) of the last micro-batch that ran, in the global batch's order
        # (the same on all of them; a collective)
        latents = None if not len(dead) else gather_rows(self.latents)
        if latents is not None and len(latents):
            # Restart each dead code at an encoder output of this batch, picked by the step's seed.
            g = torch.Generator().manual_seed(seed_of(self.cfg.seed, step, 7))
            pick = torch.randint(0, len(latents), (len(dead),), generator=g).to(latents.device)
            codebook.data[dead] = latents[pick].to(codebook.dtype)
            if dist.is_initialized():
                dist.broadcast(codebook.data, src=0)
        self.usage.zero_()


class PriorTask(Task):
    """Noise prediction on CLIP image embeddings noised with the cosine schedule, given text embeddings."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.dataset = Preencoded(cfg.data)
        if not {'clip_text', 'clip_image'} <= set(self.dataset.tensors):
            raise ValueError(f"{cfg.data} needs 'clip_text' and 'clip_image' tensors to train the prior")
        overrides = {'clip_r': self.dataset.tensors['clip_text'].shape[1], **cfg.model}
        self.model = PriorModel(PriorModel.make_config(cfg.preset, **overrides))
        self.schedule = CosineSchedule()

    def loss(self, model, batch, s):
        image, text = batch['clip_image'].float(), batch['clip_text'].float()         # (b, D), (b, D)
        if s.coin(self.cfg.p_uncond_prior):
            text = torch.zeros_like(text)
        t = 1 - s.rand()
        noised, noise = self.schedule.diffuse(image, t, s.randn(image.shape[1]))
        noised, t, text, noise = on(self.device, noised, t, text, noise)
        return F.mse_loss(model(noised, t, text).float(), noise), {}
