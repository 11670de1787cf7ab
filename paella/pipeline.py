"""Prompt in, images out: text encoders -> (CLIP prior) -> Paella sampler -> VQGAN decode.

`Pipeline` holds the models and the sampling `Settings`, encodes prompts (`conditions`) and images
(`encode_images`), samples through one route (`run`) and decodes (`decode`); the editing modes are the
functions of `paella.editing`. A pipeline folder holds ``pipeline.json`` (the encoders' names or paths,
the settings) and a model folder per trained component (``generator/``, ``vqgan/``, maybe ``prior/``).
"""
import json
import time
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import checks, editing, lora
from .captions import save_captions
from .checkpoint import atomic_write
from .editing import Options
from .guidance import v3_attn_weights
from .images import load_image, tokens_to_images
from .loading import default_model_path, pipeline_parts, v3_parts  # noqa: F401 (default_model_path: re-exported)
from .model import Paella
from .offload import using
from .prior import sample_prior
from .sampler import sample
from .settings import PIPELINE_NAME, Settings, tuples
from .vq import VQModel

class Pipeline(lora.Adapters):
    """Text to image (``pipe(prompts)``) and the editing modes of `paella.editing`."""

    def __init__(self, generator, vqgan, text_encoder, clip=None, prior=None, settings=None, specs=None, cache=None,
                 captions=None, native=False):
        self.generator, self.vqgan, self.text_encoder = generator.eval(), vqgan.eval(), text_encoder
        self.native = native            # images at the VQGAN's native size, without its super-resolving stages
        self.captions = captions        # `paella.captions.Captions`: unseen prompts drawn as training captions
        self.runner = self.generator                # what the sampler calls: the generator, or compiled
        self.loras = {}                             # LoRA adapters on the generator: name -> (folder, scale)
        # The prior may be an `offload.OnDemand` loader (low memory): loaded for each use, released after.
        self.clip, self.prior = clip, prior.eval() if isinstance(prior, torch.nn.Module) else prior
        self.cache = cache              # an EmbeddingCache: each prompt's text / CLIP embeddings kept on disk
        self.settings = settings or Settings()
        self.caps = checks.Caps()       # the most one call may ask for (steps, canvas side, images, ...)
        self.specs = specs or {}      # how to reload the encoders: {'text_encoder': {...}, 'clip': {...}}
        cfg = generator.config
        if text_encoder.width != cfg.byt5_embd:         # e.g. a smaller ByT5 for v3 (dome272/Paella#23)
            raise ValueError(f"text encoder is {text_encoder.width} wide, the generator expects {cfg.byt5_embd}: it "
                             f"was trained on one encoder's states and no other can stand in (Paella v3: ByT5-XL, "
                             f"2560 wide; low memory runs it in the memory of one of its layers)")
        if clip is not None and clip.width != cfg.clip_embd:
            raise ValueError(f"CLIP embeddings are {clip.width} wide, the generator expects {cfg.clip_embd}")
        if prior is not None and (clip is None or prior.config.clip_r != clip.width):
            raise ValueError("the prior needs a CLIP encoder of its width (clip_r)")
        if captions is not None:
            captions.check_encoder(text_encoder)

    @property
    def device(self):
        return next(self.generator.parameters()).device

    @property
    def renoise_rules(self):
        """The re-noising rules this generator can run: 'critic' only with a noise-detection head."""
        head = getattr(self.generator, 'critic', None) is not None      # as `sample` checks it
        return tuple(r for r in checks.RENOISE_RULES if head or r != 'critic')

    @property
    def pixels_per_token(self):
        """The VQGAN's pixels a token a side: 16 with two super-resolving stages, 4 if ``native``."""
        return self.vqgan.native_downsampling if self.native else self.vqgan.downsampling

    @property
    def pixel_multiple(self):
        """Image sides must be multiples of this: the pixels per token x the U-Net's downsampling."""
        return self.pixels_per_token * self.generator.downsampling

    @property
    def image_size(self):
        """(W, H) in pixels of the pipeline's default canvas."""
        h, w = self.settings.latent_size
        return w * self.pixels_per_token, h * self.pixels_per_token

    def compile(self):
        """Sample through torch.compile (CUDA graphs on GPUs); the first call of each shape compiles."""
        from .speed import compile_model
        self.runner = compile_model(self.generator)
        return self

    @classmethod
    def v3(cls, paella, vqgan, prior, byt5='google/byt5-xl', clip='laion/CLIP-ViT-H-14-laion2B-s32B-b79K',
           device=None, dtype='auto', preset=None, low_memory=None, cache=None):
        """The published Paella v3 from the official files (paella_v3.pt, vqgan_f4.pt, prior_v1.pt) and the
        ByT5-XL and CLIP-H models (Hugging Face names or local folders), with `Settings.v3`. dtype: of the
        generator and the prior ('auto': bfloat16 where native, see paella.speed); encoders and VQGAN stay
        float32, as in `from_pretrained`; low_memory, cache: as there."""
        return cls(**v3_parts(paella, vqgan, prior, byt5, clip, device, dtype, preset, low_memory, cache))

    @classmethod
    def assemble(cls, generator, vqgan, text_encoder='minilm', pad_to=24, image_size=None, **settings):
        """A pipeline from a trained generator and VQGAN (model folders) and a text encoder ('minilm',
        'minilm:<folder>', 'byt5:<name or folder>'; see `conditioning.encoder_spec`), with neutral
        `Settings` for a square canvas of ``image_size`` pixels (default: 16 tokens a side); ``settings``:
        fields to change."""
        from .conditioning import encoder_spec, load_text_encoder
        names = [f.name for f in fields(Settings)]
        for key in settings:
            if key not in names:
                raise ValueError(f"unknown setting {key!r}; settings: {', '.join(names)}")
        spec = encoder_spec(text_encoder, pad_to)
        if spec is None:
            raise ValueError("a pipeline needs a text encoder, got 'none'")
        gen, vq = Paella.from_pretrained(generator), VQModel.from_pretrained(vqgan)
        side = vq.downsampling * gen.downsampling
        if image_size is not None and checks.integer(image_size, 'image_size', side, checks.Caps().side) % side:
            raise ValueError(f"image_size must be a multiple of {side} pixels for this generator and VQGAN "
                             f"({vq.downsampling} px a token), got {image_size!r}")
        grid = Settings().latent_size[0] if image_size is None else image_size // vq.downsampling
        s = checks.settings(Settings(**tuples({'latent_size': (grid, grid), **settings})), checks.Caps())
        return cls(gen, vq, load_text_encoder(spec), settings=s, specs={'text_encoder': spec})

    def save_pretrained(self, folder, dtype=None):
        """Write the pipeline folder; ``dtype=torch.float16`` halves the size of the weights on disk."""
        if 'text_encoder' not in self.specs:        # a folder that could not be loaded again: refuse now
            raise ValueError("this pipeline does not say how to load its text encoder again: pass "
                             "specs={'text_encoder': {'type': 'minilm'}} (or 'byt5' with a 'path') to Pipeline(), "
                             "or build it with Pipeline.assemble / from_pretrained / v3")
        if self.loras:
            raise ValueError("this pipeline has LoRA adapters on: fuse_lora() to save them built in, or "
                             "unload_lora() to save the model without them")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_captions(self.captions, folder)
        for name, model in (('generator', self.generator), ('vqgan', self.vqgan), ('prior', self.prior)):
            if model is not None:
                with using(model) as model:
                    sd = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                          for k, v in model.state_dict().items()}
                    model.save_pretrained(folder / name, state_dict=sd)
        meta = {'settings': asdict(self.settings), **self.specs}
        atomic_write(folder / PIPELINE_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + '\n'))
        return folder

    @classmethod
    def from_pretrained(cls, folder=None, device=None, dtype='auto', low_memory=None, cache=None, native=False):
        """A pipeline folder; with no folder, the emoji model shipped inside the package. dtype: of the
        generator and the prior ('auto': bfloat16 where native, float32 elsewhere; see paella.speed); the
        VQGAN and the text encoder stay float32. native: images at the VQGAN's native size (without its
        super-resolving stages). low_memory: one large model in memory at a time (`paella.loading`), every
        encoder in ``dtype``; None (default): on when the models would fill most of the available RAM.
        cache: an `EmbeddingCache` or its folder for the prompts' text and CLIP embeddings (default: none,
        or `default_cache_folder()` in low memory); False: none."""
        return cls(**pipeline_parts(folder, device, dtype, low_memory, cache), native=native)

    def settings_with(self, overrides):
        """The pipeline's settings with some fields replaced (a dict: steps=, cfg=, ...), each checked."""
        checks.overrides(overrides, Settings)
        return checks.settings(replace(self.settings, **tuples(overrides)), self.caps, self.pixels_per_token)

    def options(self, seed=None, generator=None, negative_prompt='', callback=None, output='pil', overrides=None):
        """One call's `Options`, every value checked before any work (`paella.checks`)."""
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be a function (i, tokens), got {type(callback).__name__}")
        self.settings_with(overrides or {})
        return Options(checks.seed(seed), generator, checks.text(negative_prompt, 'negative_prompt', self.caps.prompt),
                       callback, checks.choice(output, 'output', ('pil', 'tokens')), overrides or {})

    def conditions(self, prompts, negative_prompt='', settings=None, generator=None, image_embeddings=None):
        """(conditional inputs, unconditional inputs, attention weights) for the sampler. With a CLIP
        encoder, ``image_embeddings`` (B, D) (or a list of them) replace the prior's (variations)."""
        s = settings or self.settings
        device, dtype = self.device, next(self.generator.parameters()).dtype
        b = len(prompts)
        prompts = self.drawn_as(prompts, s, generator)
        # Encoded apart, as published: the negative prompt's sequence is only as long as its own tokens.
        text = self.encode_text(list(prompts)).to(device, dtype)                          # (B, L, D)
        cond = {'byt5': text, 'clip': None, 'clip_image': None}
        uncond = {'byt5': self.encode_text([negative_prompt] * b).to(device, dtype), 'clip': None, 'clip_image': None}
        attn = None
        if self.clip is not None:
            prompts_and_negatives = list(prompts) + [negative_prompt] * b
            clip_text = (self.cache.clip_text(self.clip, prompts_and_negatives) if self.cache
                         else self.clip.encode_text(prompts_and_negatives)).to(device)     # (2B, D)
            cond['clip'], uncond['clip'] = clip_text[:b].to(dtype), clip_text[b:].to(dtype)
            image = image_embeddings
            if image is None and self.prior is not None:
                with using(self.prior) as prior:
                    image = sample_prior(prior, clip_text[:b].to(next(prior.parameters()).dtype),
                                         steps=s.prior_steps, cfg=s.prior_cfg, sampler=s.prior_sampler,
                                         generator=generator)
            if image is not None:       # (B, D), or a list of them: one image's 4 tokens each
                cond['clip_image'] = [e.to(device, dtype) for e in image] if isinstance(image, (list, tuple)) \
                    else image.to(device, dtype)
                if s.attn_text_weight is not None:
                    attn = v3_attn_weights(text.shape[1], s.attn_text_weight, s.attn_image_weight).to(device)
        return cond, uncond, attn

    def drawn_as(self, prompts, settings=None, generator=None, seed=None):
        """What the prompts are drawn as with ``seed`` (or ``generator``): the retrieval prior's choice
        (`paella.captions`) where there is one and ``caption_temperature`` is set; else, or with LoRA adapters
        on (they teach captions such as "<name>, twemoji style" that it never saw), the prompts as typed."""
        generator = generator or (Options(seed).rng(self.device) if seed is not None else None)   # as a call's
        t = (settings or self.settings).caption_temperature
        if self.captions is None or t is None or self.loras:
            return list(prompts)
        return self.captions.choose(self.text_encoder, list(prompts), t, generator)

    def encode_text(self, prompts):
        """Text states (B, L, D) of a list of prompts, zero at padding; through the cache when there is one."""
        return (self.cache.text(self.text_encoder, prompts) if self.cache else self.text_encoder.encode(prompts)).states

    def run(self, prompts=None, options=None, *, conditions=None, image_embeddings=None, init_x=None,
            mask=None, t_start=1.0, model=None, timings=None):
        """Token grids (B, H, W) from `sample` with the `Options`' settings and generator, conditioned on
        ``prompts`` (and CLIP ``image_embeddings`` (B, D)) or on ready ``conditions`` (cond, uncond, attn),
        from ``init_x`` (B, H, W) at noise level ``t_start``, kept where ``mask`` (B, H, W) is False.
        ``model`` wraps the generator; ``timings`` (a dict) gets the seconds of text encoding and sampling."""
        o = options or Options()
        s = self.settings_with(o.overrides)
        generator = o.rng(self.device)
        t0 = time.perf_counter()
        if conditions is None:
            conditions = self.conditions(prompts, o.negative_prompt, s, generator, image_embeddings)
        cond, uncond, attn = conditions
        t1 = time.perf_counter()
        # (B, H, W): the initial tokens' shape, or one grid per row of the unconditional branch
        shape = tuple(init_x.shape) if init_x is not None else (len(uncond['byt5']), *s.latent_size)
        checks.count(shape[0], 'the number of images', self.caps.images)
        checks.canvas([v * self.pixels_per_token for v in shape[:0:-1]], self.caps, 'canvas')
        tokens = sample(model or self.runner, cond, shape, uncond, steps=s.steps, renoise_steps=s.renoise_steps,
                        temperature=s.temperature, cfg=s.cfg, t_start=t_start,
                        sampling_conditional_steps=s.sampling_conditional_steps,
                        sampling_quant_steps=s.sampling_quant_steps, init_x=init_x, mask=mask,
                        mode=s.mode, codebook=self.vqgan.vquantizer.codebook.weight, attn_weights=attn,
                        renoise_rule=s.renoise_rule,
                        generator=generator, callback=o.callback, batch_cfg=s.batch_cfg, cache=s.cache)
        if timings is not None:
            timings.update(text_encoding=t1 - t0, sampling=time.perf_counter() - t1)
        return tokens

    def encode_images(self, images, size=None, native=None):
        """Token grids (B, h, w) of images (PIL / paths / bytes), resized to ``size`` (W, H; default the
        pipeline's canvas) when they differ; ``native``: read at the VQGAN's native size, without averaging
        down for its super-resolving stages (default: the pipeline's ``native``)."""
        size = tuple(size or self.image_size)
        pixels = []
        for im in images if isinstance(images, (list, tuple)) else [images]:
            im = load_image(im)
            if im.size != size:
                warnings.warn(f"the {im.size[0]}x{im.size[1]} image is resized to the model's {size[0]}x{size[1]} "
                              f"canvas")
                im = im.resize(size, Image.BICUBIC)
            pixels.append(np.asarray(im, dtype=np.float32) / 255)
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).to(self.device)   # (B, 3, H, W)
        with torch.no_grad():
            return self.vqgan.encode_indices(x.to(next(self.vqgan.parameters()).dtype),
                                             self.native if native is None else native)

    def decode(self, tokens, output='pil', paste=None, sizes=None):
        """PIL images of token grids (B, H, W) (``output='tokens'``: the grids themselves), each resized to
        ``sizes[i]`` (W, H) if given. ``paste``: one (image, keep (h, w) bool, (x, y)) per result, whose kept
        pixels go back in at (x, y)."""
        if checks.choice(output, 'output', ('pil', 'tokens')) == 'tokens':
            return tokens
        images = tokens_to_images(self.vqgan, tokens, self.native)
        for i, size in enumerate(sizes or ()):
            images[i] = images[i].resize(size, Image.BICUBIC)    # a copy where the size is already right
        for i, (original, keep, (x, y)) in enumerate(paste or ()):
            canvas = np.asarray(images[i]).copy()                                  # (H, W, 3)
            src = np.asarray(original)                                             # (h, w, 3)
            canvas[y:y + src.shape[0], x:x + src.shape[1]][keep] = src[keep]
            images[i] = Image.fromarray(canvas)
        return images

    def tokens(self, prompts, negative_prompt='', seed=None, generator=None, callback=None, timings=None,
               **overrides):
        """Sampled token grids (B, H, W) for a prompt or a list of prompts. ``timings`` (a dict) receives
        the seconds spent encoding the text and sampling."""
        o = self.options(seed, generator, negative_prompt, callback, 'tokens', overrides)
        return self.run(checks.prompts(prompts, self.caps), o, timings=timings)

    def __call__(self, prompts, negative_prompt='', seed=None, generator=None, timings=None, output='pil',
                 callback=None, **overrides):
        """A list of PIL images, one per prompt (``output='tokens'``: the token grids). ``overrides`` are
        `Settings` fields (steps=, cfg=, ...)."""
        checks.choice(output, 'output', ('pil', 'tokens'))
        tokens = self.tokens(prompts, negative_prompt, seed, generator, callback, timings, **overrides)
        t0 = time.perf_counter()
        images = self.decode(tokens, output)
        if timings is not None:
            timings['decoding'] = time.perf_counter() - t0
        return images

    # The editing modes: `paella.editing` has them and their documentation.

    def inpaint(self, image, mask, prompt, negative_prompt='', dilate=0, keep_pixels=True, seed=None,
                generator=None, output='pil', callback=None, **overrides):
        """Regenerate the masked part (white = regenerate) of an image: `editing.inpaint`."""
        o = self.options(seed, generator, negative_prompt, callback, output, overrides)
        return editing.inpaint(self, image, mask, prompt, dilate, keep_pixels, o)

    def outpaint(self, image, prompt, size, position='center', negative_prompt='', keep_pixels=True, seed=None,
                 generator=None, output='pil', callback=None, **overrides):
        """Place the image on a larger canvas and generate the rest: `editing.outpaint`."""
        o = self.options(seed, generator, negative_prompt, callback, output, overrides)
        return editing.outpaint(self, image, prompt, size, position, keep_pixels, o)

    def edit(self, image, prompt, strength=0.5, negative_prompt='', seed=None, generator=None, output='pil',
             callback=None, **overrides):
        """Re-noise the image to ``strength`` and denoise it toward the prompt: `editing.edit`."""
        o = self.options(seed, generator, negative_prompt, callback, output, overrides)
        return editing.edit(self, image, prompt, strength, o)

    def variations(self, image, n=4, prompt='', strength=0.6, negative_prompt='', seed=None, generator=None,
                   output='pil', callback=None, **overrides):
        """n variations of one image: `editing.variations`."""
        o = self.options(seed, generator, negative_prompt, callback, output, overrides)
        return editing.variations(self, image, n, prompt, strength, o)

    def interpolate(self, prompt_a, prompt_b, n=5, method='linear', negative_prompt='', seed=0, output='pil',
                    callback=None, generator=None, **overrides):
        """n images along the conditioning from prompt_a to prompt_b: `editing.interpolate`."""
        o = self.options(seed, generator, negative_prompt, callback, output, overrides)
        return editing.interpolate(self, prompt_a, prompt_b, n, method, o)

    def regional(self, regions, size=None, background='', negative_prompt='', num_images=1, seed=None,
                 generator=None, output='pil', callback=None, **overrides):
        """One image following several prompts, each in its region: `editing.regional`."""
        o = self.options(seed, generator, negative_prompt, callback, output, overrides)
        return editing.regional(self, regions, size, background, num_images, o)
