"""Prompt in, images out: text encoders -> (CLIP prior) -> Paella sampler -> VQGAN decode.

A pipeline folder holds ``pipeline.json`` (which encoders, the sampling settings) and one model folder
per trained component (``generator/``, ``vqgan/``, optionally ``prior/``). Text and CLIP encoders are
referenced by name or path, not copied. ``Pipeline.v3(...)`` assembles the published Paella v3 from the
official files with the published demo's settings.
"""
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .checkpoint import CheckpointError, atomic_write
from .editing import EditingMixin
from .model import Paella
from .prior import PriorModel, sample_prior
from .sampler import sample
from .vq import VQModel

PIPELINE_NAME = 'pipeline.json'


@dataclass
class Settings:
    """Sampling settings of a pipeline; the defaults are the published v3 demo's."""
    latent_size: tuple = (64, 64)                   # token grid (H, W); pixels are 4x with the f4 VQGAN
    steps: int = 32
    renoise_steps: int | None = 26
    temperature: tuple = (1.2, 0.2)
    cfg: float | tuple | None = 8.0
    sampling_conditional_steps: int | None = 20     # guidance for the first 20 steps only
    mode: str = 'cdf'                               # the published step is 'multinomial' (paella.speed)
    batch_cfg: bool = True                          # one forward for both CFG branches
    cache: bool = True                              # conditioning keys/values computed once per run
    attn_text_weight: float | None = 1.2            # attention reweighting when an image embedding is used
    attn_image_weight: float | None = 0.4
    prior_steps: int = 60
    prior_cfg: float | None = 3.0
    prior_sampler: str = 'ddpm'


def v3_attn_weights(text_length, text_weight=1.2, image_weight=0.4):
    """The published demo's weights: a vector as long as the ByT5 sequence L, applied to the last L
    conditioning keys, whose last 4 (the image-embedding tokens) get ``image_weight``."""
    w = torch.full((text_length,), float(text_weight))
    w[-4:] = image_weight
    return w


def _load_text_encoder(spec, device):
    from . import conditioning
    if spec['type'] == 'byt5':
        return conditioning.byt5_encoder(spec['path'], device=device, pad_to=spec.get('pad_to'))
    if spec['type'] == 'minilm':
        return conditioning.minilm_encoder(spec.get('path'), device=device, pad_to=spec.get('pad_to', 24))
    raise CheckpointError(f"unknown text encoder type {spec['type']!r} (expected 'byt5' or 'minilm')")


def default_model_path():
    """The folder of the default emoji model inside the installed package."""
    return Path(__file__).resolve().parent / 'weights' / 'openmoji'


def _source(name_or_path):
    """A local folder as an absolute path (a saved pipeline may be used from anywhere); a hub name as is."""
    p = Path(name_or_path)
    return str(p.resolve()) if p.exists() else str(name_or_path)


class Pipeline(EditingMixin):
    """Text-to-image (``pipe(prompts)``) and the editing modes of `EditingMixin`."""

    def __init__(self, generator, vqgan, text_encoder, clip=None, prior=None, settings=None, specs=None):
        self.generator, self.vqgan, self.text_encoder = generator.eval(), vqgan.eval(), text_encoder
        self.runner = self.generator                # what the sampler calls: the generator, or compiled
        self.clip, self.prior = clip, prior.eval() if prior is not None else None
        self.settings = settings or Settings()
        self.specs = specs or {}      # how to reload the encoders: {'text_encoder': {...}, 'clip': {...}}
        cfg = generator.config
        if text_encoder.width != cfg.byt5_embd:
            raise ValueError(f"text encoder is {text_encoder.width} wide, the generator expects {cfg.byt5_embd}")
        if clip is not None and clip.width != cfg.clip_embd:
            raise ValueError(f"CLIP embeddings are {clip.width} wide, the generator expects {cfg.clip_embd}")
        if prior is not None and (clip is None or prior.config.clip_r != clip.width):
            raise ValueError("the prior needs a CLIP encoder of its width (clip_r)")

    @property
    def device(self):
        return next(self.generator.parameters()).device

    def compile(self):
        """Sample through torch.compile (CUDA graphs on GPUs); the first call of each shape compiles."""
        from .speed import compile_model
        self.runner = compile_model(self.generator)
        return self

    @classmethod
    def v3(cls, paella, vqgan, prior, byt5='google/byt5-xl', clip='laion/CLIP-ViT-H-14-laion2B-s32B-b79K',
           device=None, dtype='auto', preset=None):
        """The published Paella v3 from the official files (paella_v3.pt, vqgan_f4.pt, prior_v1.pt) and the
        ByT5-XL and CLIP-H models (Hugging Face names or local folders). dtype: of the generator and the
        prior ('auto': bfloat16 where native, see paella.speed); encoders and VQGAN stay float32, as in
        `from_pretrained`."""
        from .conditioning import byt5_encoder, clip_encoder
        from .speed import resolve_dtype
        dtype = resolve_dtype(dtype, device)
        presets = dict(paella=preset or 'v3', vq=preset or 'f4', prior=preset or 'v1')
        return cls(Paella.from_pretrained(paella, preset=presets['paella'], device=device, dtype=dtype),
                   VQModel.from_pretrained(vqgan, preset=presets['vq'], device=device),
                   byt5_encoder(byt5, device=device), clip_encoder(clip, device=device),
                   PriorModel.from_pretrained(prior, preset=presets['prior'], device=device, dtype=dtype),
                   specs={'text_encoder': {'type': 'byt5', 'path': _source(byt5)}, 'clip': {'path': _source(clip)}})

    def save_pretrained(self, folder, dtype=None):
        """Write the pipeline folder; ``dtype=torch.float16`` halves the size of the weights on disk."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, model in (('generator', self.generator), ('vqgan', self.vqgan), ('prior', self.prior)):
            if model is not None:
                sd = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                      for k, v in model.state_dict().items()}
                model.save_pretrained(folder / name, state_dict=sd)
        meta = {'settings': asdict(self.settings), **self.specs}
        atomic_write(folder / PIPELINE_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + '\n'))
        return folder

    @classmethod
    def from_pretrained(cls, folder=None, device=None, dtype='auto'):
        """A pipeline folder; with no folder, the emoji model shipped inside the package. dtype: of the
        generator and the prior ('auto': bfloat16 where native, float32 elsewhere; see paella.speed); the
        VQGAN and the text encoder stay float32."""
        from .conditioning import clip_encoder
        from .speed import resolve_dtype
        dtype = resolve_dtype(dtype, device)
        folder = Path(folder) if folder is not None else default_model_path()
        if not (folder / PIPELINE_NAME).is_file() and folder == default_model_path():
            raise CheckpointError(f"the default emoji model is not installed (expected in {folder}); "
                                  f"pass a pipeline folder")
        if not (folder / PIPELINE_NAME).is_file():
            raise CheckpointError(f"{folder} is not a pipeline folder: it has no {PIPELINE_NAME}")
        meta = json.loads((folder / PIPELINE_NAME).read_text())
        settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta['settings'].items()})
        # Weights may be stored in half precision to keep the package small; compute in `dtype`.
        def load(cls_, sub, dt=dtype):
            return cls_.from_pretrained(folder / sub, device=device, dtype=dt)
        prior = load(PriorModel, 'prior') if (folder / 'prior').is_dir() else None
        return cls(load(Paella, 'generator'), load(VQModel, 'vqgan', torch.float32),
                   _load_text_encoder(meta['text_encoder'], device),
                   clip_encoder(meta['clip']['path'], device=device) if meta.get('clip') else None,
                   prior, settings, {k: meta[k] for k in ('text_encoder', 'clip') if k in meta})

    def conditions(self, prompts, negative_prompt='', settings=None, generator=None, image_embeddings=None):
        """(conditional inputs, unconditional inputs, attention weights) for the sampler. With a CLIP
        encoder, ``image_embeddings`` (B, D) replace the prior's (variations)."""
        s = settings or self.settings
        device, dtype = self.device, next(self.generator.parameters()).dtype
        b = len(prompts)
        # Encoded apart, as published: the negative prompt's sequence is only as long as its own tokens.
        text = self.text_encoder.encode(list(prompts)).states.to(device, dtype)             # (B, L, D)
        cond = {'byt5': text, 'clip': None, 'clip_image': None}
        uncond = {'byt5': self.text_encoder.encode([negative_prompt] * b).states.to(device, dtype),
                  'clip': None, 'clip_image': None}
        attn = None
        if self.clip is not None:
            clip_text = self.clip.encode_text(list(prompts) + [negative_prompt] * b).to(device)
            cond['clip'], uncond['clip'] = clip_text[:b].to(dtype), clip_text[b:].to(dtype)
            image = image_embeddings
            if image is None and self.prior is not None:
                image = sample_prior(self.prior, clip_text[:b].to(next(self.prior.parameters()).dtype),
                                     steps=s.prior_steps, cfg=s.prior_cfg, sampler=s.prior_sampler,
                                     generator=generator)
            if image is not None:
                cond['clip_image'] = image.to(device, dtype)
                if s.attn_text_weight is not None:
                    attn = v3_attn_weights(text.shape[1], s.attn_text_weight, s.attn_image_weight).to(device)
        return cond, uncond, attn

    def _generator(self, seed=None, generator=None):
        """The generator every random draw of a call comes from: the one given, or one seeded with ``seed``
        (a random seed when None)."""
        if generator is not None:
            return generator
        generator = torch.Generator(self.device)
        generator.manual_seed(seed) if seed is not None else generator.seed()
        return generator

    def _sample(self, cond, uncond, attn, batch, s, generator, model=None, callback=None, **kwargs):
        """`sample` with the settings ``s``; kwargs: init_x, mask, t_start."""
        return sample(model or self.runner, cond, (batch, *s.latent_size), uncond, steps=s.steps,
                      renoise_steps=s.renoise_steps, temperature=s.temperature, cfg=s.cfg,
                      sampling_conditional_steps=s.sampling_conditional_steps, mode=s.mode,
                      codebook=self.vqgan.vquantizer.codebook.weight, attn_weights=attn,
                      generator=generator, callback=callback, batch_cfg=s.batch_cfg, cache=s.cache, **kwargs)

    def _run(self, prompts, negative_prompt, seed, generator, overrides, timings=None, callback=None,
             image_embeddings=None, **kwargs):
        """Encode the prompts and sample; with init_x, the token grid's size comes from it."""
        s = replace(self.settings, **overrides)
        if 'init_x' in kwargs:
            s = replace(s, latent_size=tuple(kwargs['init_x'].shape[1:]))
        generator = self._generator(seed, generator)
        t0 = time.perf_counter()
        cond, uncond, attn = self.conditions(prompts, negative_prompt, s, generator, image_embeddings)
        t1 = time.perf_counter()
        tokens = self._sample(cond, uncond, attn, len(prompts), s, generator, callback=callback, **kwargs)
        if timings is not None:
            timings.update(text_encoding=t1 - t0, sampling=time.perf_counter() - t1)
        return tokens

    def tokens(self, prompts, negative_prompt='', seed=None, generator=None, callback=None, timings=None,
               **overrides):
        """Sampled token grids (B, H, W) for a prompt or a list of prompts. ``timings`` (a dict) receives
        the seconds spent encoding the text and sampling."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("give a prompt or a non-empty list of prompts (strings)")
        return self._run(prompts, negative_prompt, seed, generator, overrides, timings, callback)

    def __call__(self, prompts, negative_prompt='', seed=None, generator=None, timings=None, output='pil',
                 callback=None, **overrides):
        """A list of PIL images, one per prompt (``output='tokens'``: the token grids). ``overrides`` are
        `Settings` fields (steps=, cfg=, ...)."""
        tokens = self.tokens(prompts, negative_prompt, seed, generator, callback, timings, **overrides)
        t0 = time.perf_counter()
        images = self._finish(tokens, output)
        if timings is not None:
            timings['decoding'] = time.perf_counter() - t0
        return images
