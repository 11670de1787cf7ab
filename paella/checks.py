"""Every value a person gives, checked once, before any work, with one sentence for each mistake.

The command line, the Python API and the server call these same functions, so a seed of 1.5 reads the same
everywhere: ``seed must be a whole number, got 1.5``. Each check returns the clean value, or raises
`TypeError` (a value of the wrong kind: a text where a number belongs, a bool for a count) or `ValueError`
(the right kind out of range). The server turns both into HTTP 400; the CLI into exit status 2.

`Caps` are what one call may ask for at most: more would run for hours or fail to allocate. A pipeline
carries its own (``pipe.caps``, change them there); the server's `Limits` are lower.
"""
import math
import numbers
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path


@dataclass(frozen=True)
class Caps:
    steps: int = 1000        # sampling steps: beyond a few dozen nothing improves
    side: int = 1024         # canvas side in pixels (v3: 256x256 tokens, 2 GB of logits per image)
    images: int = 64         # images per call: the whole batch is sampled at once
    regions: int = 16        # prompts of one regional image: one forward holds them all
    prompt: int = 2000       # characters per prompt: encoders read at most a few hundred


SEED_MAX = 2 ** 63 - 1      # torch takes 64 bits; JSON clients (and the server) stop at signed 64
RENOISE_RULES = ('random', 'confidence', 'halton', 'critic')   # paella.renoise.RULES (this module imports no torch)


def is_number(value):
    """A finite int or float that fits in 64 bits (not a bool, not NaN, not a 400-digit integer)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return abs(value) < 2 ** 63 if isinstance(value, numbers.Integral) else math.isfinite(value)


def short(value):
    """A value for an error message, cut short (a 5000-digit integer is not worth echoing)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 30 else 'a huge integer'
    return text if len(text) <= 40 else text[:37] + '...'


def number(value, name, lo, hi, integer=False):
    """A number in [lo, hi] (``integer``: a whole one, returned as int)."""
    kind = 'a whole number' if integer else 'a number'
    if isinstance(value, bool) or not isinstance(value, numbers.Real):       # numpy's numbers are Real too
        raise TypeError(f"{name} must be {kind} between {lo} and {hi}, got {short(value)}")
    if not is_number(value):
        raise ValueError(f"{name} must be {kind} between {lo} and {hi}, got {short(value)}")
    if integer and int(value) != value:
        raise ValueError(f"{name} must be {kind}, got {short(value)}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, got {short(value)}")
    return int(value) if integer else float(value)


def integer(value, name, lo, hi):
    return number(value, name, lo, hi, integer=True)


def seed(value):
    """None (a random seed) or a whole number in [0, SEED_MAX]."""
    return None if value is None else integer(value, 'seed', 0, SEED_MAX)


def text(value, name, limit, required=False):
    """A prompt: real Unicode (a lone surrogate such as '\\ud800' is not text), at most ``limit`` characters."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a text, got {short(value)}")
    if required and not value.strip():
        raise ValueError(f"{name} must be a non-empty text")
    if len(value) > limit:
        raise ValueError(f"{name} is {len(value)} characters long; the limit is {limit}")
    try:
        value.encode('utf-8')
    except UnicodeEncodeError:
        raise ValueError(f"{name} contains characters that are not valid Unicode text") from None
    return value


def prompts(value, caps):
    """A prompt or a list of prompts -> a non-empty list of checked prompts, at most ``caps.images``."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"prompts must be a text or a list of texts, got {short(value)}")
    if not items:
        raise ValueError("give at least one prompt")
    count(len(items), 'the number of images', caps.images)
    return [text(p, 'prompt' if len(items) == 1 else f'prompt {i}', caps.prompt) for i, p in enumerate(items)]


def count(value, name, cap, lo=1):
    """A number of things (images, regions, frames) in [lo, cap]."""
    return integer(value, name, lo, cap)


def schedule(value, name, lo, hi):
    """A number, or a (start, end) pair for a linear schedule over the steps (cfg, temperature)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a number or [start, end], got a list of {len(value)}")
        return tuple(number(v, name, lo, hi) for v in value)
    return number(value, name, lo, hi)


def _pair(value):
    return value if isinstance(value, tuple) else (value,)


def choice(value, name, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(str, options))}, got {short(value)}")
    return value


def settings(s, caps, pixels_per_token=1):
    """A pipeline's `Settings` with each field checked and cleaned (whole numbers as int, pairs as tuples);
    the canvas (latent_size x ``pixels_per_token``) within ``caps.side``."""
    def optional(check, value, *args):
        return None if value is None else check(value, *args)
    if not (isinstance(s.latent_size, (list, tuple)) and len(s.latent_size) == 2):
        raise TypeError(f"latent_size must be (height, width) in tokens, got {short(s.latent_size)}")
    latent = tuple(integer(v, 'latent_size', 1, max(1, caps.side // pixels_per_token)) for v in s.latent_size)
    temperature = schedule(s.temperature, 'temperature', 0, 100)
    if s.mode != 'argmax' and min(_pair(temperature)) <= 0:        # argmax never reads it
        raise ValueError(f"temperature must be above 0, got {short(s.temperature)}")
    for name in ('batch_cfg', 'cache'):
        if not isinstance(getattr(s, name), bool):
            raise TypeError(f"{name} must be True or False, got {short(getattr(s, name))}")
    return replace(
        s, latent_size=latent, temperature=temperature, steps=integer(s.steps, 'steps', 1, caps.steps),
        renoise_steps=optional(integer, s.renoise_steps, 'renoise_steps', 0, caps.steps),
        cfg=optional(schedule, s.cfg, 'cfg', 0, 100),
        sampling_conditional_steps=optional(integer, s.sampling_conditional_steps, 'sampling_conditional_steps',
                                            0, caps.steps),
        sampling_quant_steps=optional(integer, s.sampling_quant_steps, 'sampling_quant_steps', 0, caps.steps),
        mode=choice(s.mode, 'mode', ('multinomial', 'cdf', 'argmax', 'quant')),
        renoise_rule=choice(s.renoise_rule, 'renoise_rule', RENOISE_RULES),
        prior_sampler=choice(s.prior_sampler, 'prior_sampler', ('ddpm', 'ddim')),
        prior_steps=integer(s.prior_steps, 'prior_steps', 1, caps.steps),
        **{name: optional(number, getattr(s, name), name, 0, 100)
           for name in ('prior_cfg', 'attn_text_weight', 'attn_image_weight')},
        caption_temperature=optional(number, s.caption_temperature, 'caption_temperature', 0, 10))


def overrides(values, settings_type):
    """Keyword overrides of `Settings` fields: an unknown name is a TypeError, as for any function."""
    names = [f.name for f in fields(settings_type)]
    for key in values:
        if key not in names:
            raise TypeError(f"unknown setting {key!r}; settings: {', '.join(names)}")
    return values


def canvas(size, caps, name='size'):
    """(width, height) in pixels: whole numbers from 1 to ``caps.side``."""
    if not (isinstance(size, (tuple, list)) and len(size) == 2):
        raise TypeError(f"{name} must be (width, height) in pixels, got {short(size)}")
    return tuple(integer(v, f'{name} {side}', 1, caps.side) for v, side in zip(size, ('width', 'height')))


def device(value):
    """None, or a device this PyTorch can use: 'cpu', 'cuda', 'cuda:1', 'mps', ..."""
    if value is None:
        return None
    import torch
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {short(value)}") from None
    backend = getattr(torch, dev.type, None) if dev.type != 'cpu' else None
    if dev.type != 'cpu' and not (backend is not None and backend.is_available()):
        raise ValueError(f"device {value}: this PyTorch build or machine has no {dev.type} device "
                         f"(torch {torch.__version__}); use --device cpu")
    if dev.type == 'cuda' and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def output_path(path):
    """Where images will be written, checked before any work: a file name with an image extension Pillow
    writes, in a folder that exists (or can be made) and is writable, not a directory or a device."""
    from PIL import Image
    p = Path(path)
    writable = sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)
    if p.is_dir():
        raise ValueError(f"output {path} is a directory: give a file name such as {p / 'image.png'}")
    if p.exists() and not p.is_file():
        raise ValueError(f"output {path} is not a regular file (a device or a pipe)")
    if p.suffix.lower() not in writable:
        got = "has no extension" if not p.suffix else f"ends in {p.suffix}, which is not an image format"
        raise ValueError(f"output {path} {got}: use .png, .jpg or .webp")
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if parent is None or not parent.is_dir():
        raise ValueError(f"output {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"output {path}: the folder {parent} is not writable")
    return p
