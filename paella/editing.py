"""Image editing with the one sampler. Each mode is a function of a `Pipeline` and one `Options` that only
turns pixels, masks and prompts into what `Pipeline.run` (and so `sampler.sample`) takes:

- inpaint / outpaint: ``init_x`` = the image's tokens (on a larger canvas to outpaint) and a ``mask``
  (True = generate); the sampler keeps every other token exactly;
- edit (and variations without CLIP): ``init_x`` = the image's tokens with a fraction ``strength`` replaced
  by random tokens, sampled from ``t_start = strength``;
- variations with CLIP (Paella v3): the image's CLIP embedding as the ``clip_image`` condition;
- interpolate: conditions mixed between two prompts (linear or spherical), every frame from one seed;
- regional: the conditional branch is a `guidance.RegionalModel`: one forward over all region prompts,
  whose logits are blended by the regions' masks.

Images may be PIL images, paths or PNG/JPEG bytes; masks may also be boolean arrays. Modes return PIL
images (``output='tokens'``: the token grids).
"""
import math
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import checks
from .guidance import RegionalModel
from .images import load_image, open_image_as_is
from .noise import add_noise

POSITIONS = ('center', 'left', 'right', 'top', 'bottom', 'top-left', 'top-right', 'bottom-left', 'bottom-right')


@dataclass(frozen=True)
class Options:
    """What every mode takes besides its inputs. ``overrides``: `Settings` fields (steps=, cfg=, ...)."""
    seed: int | None = None
    generator: torch.Generator | None = None    # wins over seed
    negative_prompt: str = ''
    callback: object = None                     # called by the sampler after each step
    output: str = 'pil'                         # or 'tokens'
    overrides: dict = field(default_factory=dict)

    def rng(self, device):
        """The generator of every draw of a call: the one given, or one seeded with ``seed`` (random if None)."""
        if self.generator is not None:
            return self.generator
        generator = torch.Generator(device)
        generator.manual_seed(self.seed) if self.seed is not None else generator.seed()
        return generator


def load_mask(mask, size):
    """A boolean pixel mask (H, W), True = regenerate (white / nonzero), of exactly ``size`` (W, H)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.cpu().numpy()
    if isinstance(mask, np.ndarray):
        array = mask.astype(bool)
        if array.ndim != 2:
            raise ValueError(f"a mask array must be 2-D (H, W), got shape {array.shape}")
    else:
        array = np.asarray(open_image_as_is(mask, 'mask').convert('L')) > 127
    if array.shape != (size[1], size[0]):
        raise ValueError(f"the mask is {array.shape[1]}x{array.shape[0]}, the image {size[0]}x{size[1]}: "
                         f"they must be the same size")
    return array


def pixel_to_token_mask(mask, f, dilate=0):
    """(H, W) pixel mask -> (H/f, W/f) token mask: a token is regenerated if any of its pixels is masked;
    ``dilate`` grows the token mask by that many tokens in every direction."""
    h, w = mask.shape
    tokens = torch.from_numpy(np.ascontiguousarray(mask)).view(h // f, f, w // f, f).any(3).any(1)
    if dilate:
        tokens = F.max_pool2d(tokens[None, None].float(), 2 * dilate + 1, 1, dilate)[0, 0] > 0
    return tokens


def canvas_size(size, image, m, caps):
    """The outpainting canvas (W, H): ``size`` checked against the ``image`` size (w, h) and the ``caps``,
    and rounded up to multiples of ``m``, with a warning."""
    cw, ch = checks.canvas(size, caps)
    w, h = image
    if cw < w or ch < h:
        raise ValueError(f"the canvas {cw}x{ch} is smaller than the image {w}x{h}")
    if cw % m or ch % m:
        cw, ch = -(-cw // m) * m, -(-ch // m) * m
        checks.canvas((cw, ch), caps)
        warnings.warn(f"canvas rounded up to {cw}x{ch}: sides must be multiples of {m} for this model")
    return cw, ch


def place(position, canvas, image, f):
    """The top-left corner (x, y) of an ``image`` (w, h) at ``position`` on the ``canvas`` (W, H), on the
    grid of the VQGAN's ``f``."""
    (cw, ch), (w, h) = canvas, image
    if isinstance(position, str):
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS} or (x, y), got {position!r}")
        x = 0 if 'left' in position else cw - w if 'right' in position else (cw - w) // 2
        y = 0 if 'top' in position else ch - h if 'bottom' in position else (ch - h) // 2
    elif isinstance(position, (tuple, list)) and len(position) == 2:
        x, y = (checks.integer(v, f'position {axis}', -10 ** 6, 10 ** 6) for v, axis in zip(position, 'xy'))
    else:
        raise ValueError(f"position must be one of {POSITIONS} or (x, y), got {position!r}")
    sx, sy = x // f * f, y // f * f
    if (sx, sy) != (x, y) and not isinstance(position, str):
        warnings.warn(f"position rounded to ({sx}, {sy}): a multiple of the VQGAN's {f}")
    if not (0 <= sx <= cw - w and 0 <= sy <= ch - h):
        raise ValueError(f"the image {w}x{h} at ({x}, {y}) does not fit on the {cw}x{ch} canvas")
    return sx, sy


def slerp(a, b, alpha, eps=1e-7):
    """Spherical interpolation of the last dimension of a and b; linear where vectors are (anti)parallel
    or zero (e.g. padding states)."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    cos = ((a * b).sum(-1, keepdim=True) / (na * nb).clamp(min=eps)).clamp(-1, 1)
    theta = torch.acos(cos)
    s = torch.sin(theta)
    spherical = (torch.sin((1 - alpha) * theta) * a + torch.sin(alpha * theta) * b) / s.clamp(min=eps)
    return torch.where(s > 1e-4, spherical, torch.lerp(a, b, alpha))


def mix_conditions(a, b, alpha, method='linear'):
    """Conditions (dicts of tensors or None) between a (alpha 0, returned as is) and b (alpha 1)."""
    if alpha == 0:
        return a
    if alpha == 1:
        return b
    mix, out = slerp if method == 'slerp' else torch.lerp, {}
    for k, va in a.items():
        vb = b[k]
        if va is not None and va.dim() == 3 and va.shape[1] != vb.shape[1]:   # text states: pad the shorter
            n = max(va.shape[1], vb.shape[1])
            va, vb = (F.pad(v, (0, 0, 0, n - v.shape[1])) for v in (va, vb))
        out[k] = None if va is None else mix(va.float(), vb.float(), alpha).to(va.dtype)
    return out


def region_mask(region, size, caps):
    """A (H, W) pixel mask from a box (x0, y0, x1, y1) in pixels (each within ``caps.side``) or a mask image /
    array of the canvas size."""
    if isinstance(region, (tuple, list)) and len(region) == 4 and all(isinstance(v, (int, float)) for v in region):
        x0, y0, x1, y1 = (round(checks.number(v, 'a box coordinate', 0, caps.side)) for v in region)
        if not (0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]):
            raise ValueError(f"box {tuple(region)} is not a non-empty box inside the {size[0]}x{size[1]} canvas")
        m = np.zeros((size[1], size[0]), dtype=bool)
        m[y0:y1, x0:x1] = True
        return m
    return load_mask(region, size)


def region_weights(regions, size, background, m, f, caps):
    """The prompts of ``regions`` (and ``background`` where none covers) and their blend weights (R, h, w):
    each prompt's share of a token is the fraction of its pixels that the region covers, normalised.
    ``size`` (W, H): the canvas, in multiples of ``m``; ``f``: the VQGAN's downsampling."""
    if not isinstance(regions, (list, tuple)) or not regions:
        raise ValueError("regions must be a non-empty list of (prompt, box or mask)")
    checks.count(len(regions), 'the number of regions', caps.regions)
    if not all(isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) for r in regions):
        raise ValueError("each region must be a pair (prompt, box or mask)")
    for p in [r[0] for r in regions] + [background]:
        checks.text(p, 'a region prompt', caps.prompt)
    size = checks.canvas(size, caps)
    if size[0] % m or size[1] % m:
        raise ValueError(f"size must be (width, height) with multiples of {m}, got {size!r}")
    masks = [region_mask(box, size, caps) for _, box in regions]
    prompts = [p for p, _ in regions]
    covered = np.any(masks, axis=0)
    if not covered.all():
        masks.append(~covered)
        prompts.append(background)
    h, w = size[1] // f, size[0] // f
    cover = torch.stack([torch.from_numpy(mk).float().view(h, f, w, f).mean((1, 3)) for mk in masks])
    return prompts, cover / cover.sum(0, keepdim=True).clamp(min=1e-8)             # (R, h, w)


def _images(x, pipe):
    """An image or a list of them (at most the pipeline's cap)."""
    images = list(x) if isinstance(x, (list, tuple)) else [x]
    if not images:
        raise ValueError("give an image or a non-empty list of images")
    checks.count(len(images), 'the number of images', pipe.caps.images)
    return images


def _broadcast(prompt, b, pipe):
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
    if len(prompts) == 1:
        prompts = prompts * b
    if len(prompts) != b or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"give one prompt (a string) or one per image ({b})")
    return [checks.text(p, 'prompt', pipe.caps.prompt) for p in prompts]


def inpaint(pipe, image, mask, prompt, dilate=0, keep_pixels=True, o=Options()):
    """Regenerate the masked part (white = regenerate) of an image, or of each image of a list (one mask,
    or one per image, at the image's pixel size). Tokens outside the mask stay exactly the image's; with
    ``keep_pixels`` the unmasked pixels of the result are the input's own. An image of another size than
    the model's canvas is inpainted on the canvas and comes back at its own size (with a note)."""
    originals = [load_image(im) for im in _images(image, pipe)]
    masks = list(mask) if isinstance(mask, (list, tuple)) else [mask] * len(originals)
    if len(masks) != len(originals):
        raise ValueError(f"give one mask or one per image: {len(masks)} masks for {len(originals)} images")
    originals_masks = [load_mask(m, im.size) for m, im in zip(masks, originals)]
    dilate = checks.integer(dilate, 'dilate', 0, pipe.caps.side)
    prompts, size, f = _broadcast(prompt, len(originals), pipe), pipe.image_size, pipe.pixels_per_token
    for im in originals:
        if im.size != size:
            warnings.warn(f"the {im.size[0]}x{im.size[1]} image is inpainted on the model's {size[0]}x{size[1]} "
                          f"canvas and scaled back")
    images = [im.resize(size, Image.BICUBIC) for im in originals]   # a copy where the size is already right
    # A token is regenerated if any of its pixels is: masks are resized with a max filter (BOX > 0).
    masks = [np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.BOX)) > 0
             for m in originals_masks]
    init = pipe.encode_images(images)                                               # (B, h, w)
    token_mask = torch.stack([pixel_to_token_mask(m, f, dilate) for m in masks]).to(init.device)
    tokens = pipe.run(prompts, o, init_x=init, mask=token_mask)
    paste = [(im, ~m, (0, 0)) for im, m in zip(originals, originals_masks)] if keep_pixels else None
    return pipe.decode(tokens, o.output, paste, sizes=[im.size for im in originals])


def outpaint(pipe, image, prompt, size, position='center', keep_pixels=True, o=Options()):
    """Place the image (or each of a list, all of one size) on a canvas of ``size`` (W, H) pixels at
    ``position`` ('center', 'left', 'top-right', ... or the (x, y) of its top-left corner) and generate
    the rest. Sizes and positions that the model's downsampling cannot take are rounded, with a warning."""
    images = [load_image(im) for im in _images(image, pipe)]
    if len({im.size for im in images}) != 1:
        raise ValueError("images to outpaint together must have the same size")
    f, (w, h) = pipe.pixels_per_token, images[0].size
    cw, ch = canvas_size(size, (w, h), pipe.pixel_multiple, pipe.caps)
    prompts = _broadcast(prompt, len(images), pipe)
    if w % f or h % f:
        w, h = max(f, w // f * f), max(f, h // f * f)
        warnings.warn(f"image resized to {w}x{h}: sides must be multiples of the VQGAN's {f}")
        images = [im.resize((w, h), Image.BICUBIC) for im in images]
    x, y = place(position, (cw, ch), (w, h), f)
    tokens = pipe.encode_images(images, size=(w, h))                                # (B, h/f, w/f)
    init = torch.zeros(len(images), ch // f, cw // f, dtype=tokens.dtype, device=tokens.device)
    init[:, y // f:(y + h) // f, x // f:(x + w) // f] = tokens
    mask = torch.ones_like(init, dtype=torch.bool)                                  # (B, H/f, W/f)
    mask[:, y // f:(y + h) // f, x // f:(x + w) // f] = False
    out = pipe.run(prompts, o, init_x=init, mask=mask)
    keep = np.ones((h, w), dtype=bool)
    return pipe.decode(out, o.output, [(im, keep, (x, y)) for im in images] if keep_pixels else None)


def edit(pipe, image, prompt, strength=0.5, o=Options()):
    """Structural editing: the image's tokens with a fraction ``strength`` replaced by random tokens,
    denoised toward the prompt from noise level ``strength`` in ceil(steps x strength) steps. Strength 0
    returns the image's tokens unchanged; strength 1 is generation from noise (same seed, same image)."""
    strength = checks.number(strength, 'strength', 0, 1)
    images = _images(image, pipe)
    prompts = _broadcast(prompt, len(images), pipe)
    init = pipe.encode_images(images)                                               # (B, h, w)
    if strength == 0:
        return pipe.decode(init, o.output)
    if strength == 1:
        return pipe.decode(pipe.run(prompts, o), o.output)
    s = pipe.settings_with(o.overrides)
    steps = max(1, math.ceil(s.steps * strength))
    generator = o.rng(pipe.device)                  # the noise is drawn first, from the sampler's generator
    t = torch.full((len(images),), float(strength), device=init.device)
    noised = add_noise(init, t, pipe.generator.num_labels, generator=generator)[0]
    o = replace(o, generator=generator, overrides={**o.overrides, 'steps': steps})
    return pipe.decode(pipe.run(prompts, o, init_x=noised, t_start=float(strength)), o.output)


def variations(pipe, image, n=4, prompt='', strength=0.6, o=Options()):
    """n variations of one image. With a CLIP encoder in the pipeline (Paella v3): sampled from noise
    given the image's CLIP embedding (and ``prompt``); a list of images conditions on all of them at once,
    each embedding its own 4 tokens (the published demo's). Otherwise: `edit` of the image's own tokens at
    ``strength`` (toward ``prompt``, empty by default) with n draws of the noise."""
    n = checks.count(n, 'n', pipe.caps.images)
    prompt = checks.text(prompt, 'prompt', pipe.caps.prompt)
    images = [load_image(im) for im in _images(image, pipe)]
    if pipe.clip is None:
        if len(images) > 1:
            raise ValueError("variations of several images together need a pipeline with CLIP (Paella v3)")
        return edit(pipe, images * n, prompt, strength, o)
    embeddings = [pipe.clip.encode_images([im]).to(pipe.device).expand(n, -1) for im in images]   # each (n, D)
    tokens = pipe.run([prompt] * n, o, image_embeddings=embeddings if len(embeddings) > 1 else embeddings[0])
    return pipe.decode(tokens, o.output)


def interpolate(pipe, prompt_a, prompt_b, n=5, method='linear', o=Options(seed=0)):
    """n images along the conditioning from prompt_a to prompt_b ('linear' or 'slerp'), every one sampled
    from the same generator state (the seed's, or the given generator's), so the first and the last are
    exactly plain generation from each prompt."""
    n = checks.count(n, 'n', pipe.caps.images, lo=2)
    checks.choice(method, 'method', ('linear', 'slerp'))
    for p, name in ((prompt_a, 'prompt_a'), (prompt_b, 'prompt_b')):
        checks.text(p, name, pipe.caps.prompt)
    s, generator = pipe.settings_with(o.overrides), o.rng(pipe.device)
    start = generator.get_state()
    cond_a, uncond, attn = pipe.conditions([prompt_a], o.negative_prompt, s, generator)
    after_prior = generator.get_state()     # the prior's draws (if any) are the same for either prompt
    generator.set_state(start)
    cond_b = pipe.conditions([prompt_b], o.negative_prompt, s, generator)[0]
    frames = []
    for alpha in torch.linspace(0, 1, n).tolist():
        generator.set_state(after_prior)
        conditions = (mix_conditions(cond_a, cond_b, alpha, method), uncond, attn)
        frames.append(pipe.run(options=replace(o, generator=generator), conditions=conditions))
    return pipe.decode(torch.cat(frames), o.output)


def regional(pipe, regions, size=None, background='', num_images=1, o=Options()):
    """One image following several prompts, each in its region: ``regions`` is a list of (prompt, box)
    with box = (x0, y0, x1, y1) in pixels of the canvas, or (prompt, mask image / array of the canvas
    size). Pixels outside every region follow ``background``. ``size`` (W, H): the canvas (default the
    pipeline's). Logits are blended per token by the regions' coverage (overlaps share)."""
    b = checks.count(num_images, 'num_images', pipe.caps.images)
    prompts, weights = region_weights(regions, size or pipe.image_size, background, pipe.pixel_multiple,
                                      pipe.pixels_per_token, pipe.caps)
    generator = o.rng(pipe.device)
    cond, uncond, attn = pipe.conditions(prompts, o.negative_prompt, pipe.settings_with(o.overrides), generator)
    # The conditional branch: R*b rows, region-major; the unconditional one: b rows of the first.
    cond = {k: v.repeat_interleave(b, 0) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
    uncond = {k: v[:1].expand(b, *v.shape[1:]) if isinstance(v, torch.Tensor) else v for k, v in uncond.items()}
    cond['regions'] = weights[:, None, None].to(pipe.device)                        # (R, 1, 1, h, w)
    o = replace(o, generator=generator, overrides={**o.overrides, 'latent_size': tuple(weights.shape[1:])})
    tokens = pipe.run(options=o, conditions=(cond, uncond, attn), model=RegionalModel(pipe.generator))
    return pipe.decode(tokens, o.output)
