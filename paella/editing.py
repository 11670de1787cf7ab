"""Image editing with the one sampler: variations, inpainting, outpainting, interpolation, structural
editing and regional prompts. Each mode only prepares what `sampler.sample` already takes:

- inpaint / outpaint: ``init_x`` = the image's tokens (on a larger canvas for outpainting) and a ``mask``
  (True = generate); the sampler keeps every other token exactly;
- edit (and variations without CLIP): ``init_x`` = the image's tokens with a fraction ``strength`` replaced
  by random tokens, sampled from ``t_start = strength``;
- variations with CLIP (Paella v3): the image's CLIP embedding as the ``clip_image`` condition;
- interpolate: conditions mixed between two prompts (linear or spherical), one shared seed;
- regional: the conditional branch is a `RegionalModel`: one forward over all region prompts, whose
  logits are blended by the regions' masks.

`EditingMixin` adds these modes to `Pipeline`. Images may be PIL images, paths or PNG/JPEG bytes; masks
may also be boolean arrays. Every mode takes ``seed`` or ``generator``, ``negative_prompt`` and sampling
overrides (``steps=``, ``cfg=``, ...), and returns PIL images (``output='tokens'``: the token grids).
"""
import math
import warnings
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from .images import load_image, open_image_as_is
from .noise import add_noise

POSITIONS = ('center', 'left', 'right', 'top', 'bottom', 'top-left', 'top-right', 'bottom-left', 'bottom-right')


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
    out = {}
    for k, va in a.items():
        vb = b[k]
        if va is None:
            out[k] = None
            continue
        if va.dim() == 3 and va.shape[1] != vb.shape[1]:      # text states of different lengths: pad with zeros
            n = max(va.shape[1], vb.shape[1])
            va, vb = (F.pad(v, (0, 0, 0, n - v.shape[1])) for v in (va, vb))
        out[k] = slerp(va.float(), vb.float(), alpha).to(va.dtype) if method == 'slerp' \
            else torch.lerp(va.float(), vb.float(), alpha).to(va.dtype)
    return out


class RegionalModel:
    """Wraps a Paella model so that a ``regions`` input (R, 1, 1, H, W) of blend weights makes one forward
    over R stacked conditions (inputs of batch R*B, region-major) and blends their logits; without
    ``regions`` (the unconditional branch) it is the model itself."""

    def __init__(self, model):
        self.model, self.num_labels = model, model.num_labels

    def __call__(self, x, r, regions=None, **inputs):
        if regions is None:
            return self.model(x, r, **inputs)
        n = regions.shape[0]
        logits = self.model(x.repeat(n, 1, 1), r.repeat(n), **inputs)           # (R*B, C, H, W)
        return (logits.unflatten(0, (n, -1)) * regions.to(logits.dtype)).sum(0)  # (B, C, H, W)


def region_mask(region, size):
    """A (H, W) pixel mask from a box (x0, y0, x1, y1) in pixels or a mask image / array of the canvas size."""
    if isinstance(region, (tuple, list)) and len(region) == 4 and all(isinstance(v, (int, float)) for v in region):
        x0, y0, x1, y1 = (int(round(v)) for v in region)
        if not (0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]):
            raise ValueError(f"box {tuple(region)} is not a non-empty box inside the {size[0]}x{size[1]} canvas")
        m = np.zeros((size[1], size[0]), dtype=bool)
        m[y0:y1, x0:x1] = True
        return m
    return load_mask(region, size)


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _round_up(v, m):
    return -(-v // m) * m


class EditingMixin:
    """Editing modes of `Pipeline` (see the module docstring). Needs ``generator``, ``vqgan``, ``settings``,
    ``conditions()``, ``_sample()`` and ``_generator()`` from the pipeline."""

    @property
    def pixel_multiple(self):
        """Image sides must be multiples of this: the VQGAN's downsampling x the U-Net's."""
        return self.vqgan.downsampling * self.generator.downsampling

    @property
    def image_size(self):
        """(W, H) in pixels of the pipeline's default canvas."""
        h, w = self.settings.latent_size
        return w * self.vqgan.downsampling, h * self.vqgan.downsampling

    def encode_images(self, images, size=None):
        """Token grids (B, h, w) of images (PIL / paths / bytes), resized to ``size`` (W, H; default the
        pipeline's canvas) when they differ."""
        size = tuple(size or self.image_size)
        pixels = []
        for im in _as_list(images):
            im = load_image(im)
            if im.size != size:
                from PIL import Image
                im = im.resize(size, Image.BICUBIC)
            pixels.append(np.asarray(im, dtype=np.float32) / 255)
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).to(self.device)   # (B, 3, H, W)
        with torch.no_grad():
            return self.vqgan.encode_indices(x.to(next(self.vqgan.parameters()).dtype))

    def _finish(self, tokens, output, paste=None):
        """Decoded images (or the tokens); ``paste`` = (originals, keep masks (B, H, W) or None, offsets)
        puts the original pixels back where they were kept."""
        if output == 'tokens':
            return tokens
        if output != 'pil':
            raise ValueError(f"output must be 'pil' or 'tokens', got {output!r}")
        from .images import tokens_to_images
        images = tokens_to_images(self.vqgan, tokens)
        if paste is not None:
            from PIL import Image
            for i, (orig, keep, (x, y)) in enumerate(zip(*paste)):
                canvas = np.asarray(images[i]).copy()
                src = np.asarray(orig)
                region = canvas[y:y + src.shape[0], x:x + src.shape[1]]
                region[keep] = src[keep]
                images[i] = Image.fromarray(canvas)
        return images

    def _broadcast(self, prompt, b):
        prompts = _as_list(prompt)
        if len(prompts) == 1:
            prompts = prompts * b
        if len(prompts) != b or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"give one prompt (a string) or one per image ({b})")
        return prompts

    def inpaint(self, image, mask, prompt, negative_prompt='', dilate=0, keep_pixels=True, seed=None,
                generator=None, output='pil', callback=None, **overrides):
        """Regenerate the masked part (white = regenerate) of an image, or of each image of a list (one mask,
        or one per image, at the image's pixel size). Tokens outside the mask stay exactly the image's; with
        ``keep_pixels`` the unmasked pixels of the result are the input's own."""
        images = [load_image(im) for im in _as_list(image)]
        masks = _as_list(mask) if isinstance(mask, (list, tuple)) else [mask] * len(images)
        if len(masks) != len(images):
            raise ValueError(f"give one mask or one per image: {len(masks)} masks for {len(images)} images")
        pixel_masks = [load_mask(m, im.size) for m, im in zip(masks, images)]
        if dilate < 0:
            raise ValueError(f"dilate must be >= 0, got {dilate}")
        size = self.image_size
        f = self.vqgan.downsampling
        from PIL import Image
        if any(im.size != size for im in images):
            images = [im.resize(size, Image.BICUBIC) for im in images]
            # A token is regenerated if any of its pixels is: resize the mask with a max filter (BOX > 0).
            pixel_masks = [np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.BOX)) > 0
                           for m in pixel_masks]
        init = self.encode_images(images)                                            # (B, h, w)
        token_mask = torch.stack([pixel_to_token_mask(m, f, dilate) for m in pixel_masks]).to(init.device)
        tokens = self._run(self._broadcast(prompt, len(images)), negative_prompt, seed, generator, overrides,
                           init_x=init, mask=token_mask, callback=callback)
        paste = (images, [~m for m in pixel_masks], [(0, 0)] * len(images)) if keep_pixels else None
        return self._finish(tokens, output, paste)

    def outpaint(self, image, prompt, size, position='center', negative_prompt='', keep_pixels=True, seed=None,
                 generator=None, output='pil', callback=None, **overrides):
        """Place the image (or each of a list, all of one size) on a canvas of ``size`` (W, H) pixels at
        ``position`` ('center', 'left', 'top-right', ... or the (x, y) of its top-left corner) and generate
        the rest. Sizes and positions that the model's downsampling cannot take are rounded, with a warning."""
        images = [load_image(im) for im in _as_list(image)]
        if len({im.size for im in images}) != 1:
            raise ValueError("images to outpaint together must have the same size")
        m, f = self.pixel_multiple, self.vqgan.downsampling
        if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(int(v) == v and v > 0 for v in size)):
            raise ValueError(f"size must be (width, height) in pixels, got {size!r}")
        cw, ch = (int(v) for v in size)
        w, h = images[0].size
        if cw < w or ch < h:
            raise ValueError(f"the canvas {cw}x{ch} is smaller than the image {w}x{h}")
        if cw % m or ch % m:
            cw, ch = _round_up(cw, m), _round_up(ch, m)
            warnings.warn(f"canvas rounded up to {cw}x{ch}: sides must be multiples of {m} for this model")
        if w % f or h % f:
            from PIL import Image
            w, h = max(f, w // f * f), max(f, h // f * f)
            warnings.warn(f"image resized to {w}x{h}: sides must be multiples of the VQGAN's {f}")
            images = [im.resize((w, h), Image.BICUBIC) for im in images]
        x, y = self._place(position, (cw, ch), (w, h), f)
        tokens = self.encode_images(images, size=(w, h))                              # (B, h/f, w/f)
        b = len(images)
        init = torch.zeros(b, ch // f, cw // f, dtype=tokens.dtype, device=tokens.device)
        mask = torch.ones(b, ch // f, cw // f, dtype=torch.bool, device=tokens.device)
        init[:, y // f:(y + h) // f, x // f:(x + w) // f] = tokens
        mask[:, y // f:(y + h) // f, x // f:(x + w) // f] = False
        out = self._run(self._broadcast(prompt, b), negative_prompt, seed, generator, overrides,
                        init_x=init, mask=mask, callback=callback)
        keep = [np.ones((h, w), dtype=bool)] * b
        return self._finish(out, output, (images, keep, [(x, y)] * b) if keep_pixels else None)

    @staticmethod
    def _place(position, canvas, image, f):
        (cw, ch), (w, h) = canvas, image
        if isinstance(position, str):
            if position not in POSITIONS:
                raise ValueError(f"position must be one of {POSITIONS} or (x, y), got {position!r}")
            x = 0 if 'left' in position else cw - w if 'right' in position else (cw - w) // 2
            y = 0 if 'top' in position else ch - h if 'bottom' in position else (ch - h) // 2
        elif isinstance(position, (tuple, list)) and len(position) == 2:
            x, y = (int(v) for v in position)
        else:
            raise ValueError(f"position must be one of {POSITIONS} or (x, y), got {position!r}")
        sx, sy = x // f * f, y // f * f
        if (sx, sy) != (x, y) and not isinstance(position, str):
            warnings.warn(f"position rounded to ({sx}, {sy}): a multiple of the VQGAN's {f}")
        if not (0 <= sx <= cw - w and 0 <= sy <= ch - h):
            raise ValueError(f"the image {w}x{h} at ({x}, {y}) does not fit on the {cw}x{ch} canvas")
        return sx, sy

    def edit(self, image, prompt, strength=0.5, negative_prompt='', seed=None, generator=None, output='pil',
             callback=None, **overrides):
        """Structural editing: the image's tokens with a fraction ``strength`` replaced by random tokens,
        denoised toward the prompt from noise level ``strength`` in ceil(steps x strength) steps. Strength 0
        returns the image's tokens unchanged; strength 1 is generation from noise (same seed, same image)."""
        if not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        images = _as_list(image)
        init = self.encode_images(images)
        prompts = self._broadcast(prompt, len(images))
        if strength == 0:
            return self._finish(init, output)
        if strength == 1:
            return self._finish(self._run(prompts, negative_prompt, seed, generator, overrides,
                                          callback=callback), output)
        s = replace(self.settings, **overrides)
        steps = max(1, math.ceil(s.steps * strength))
        renoise = min(steps - 1, s.renoise_steps if s.renoise_steps is not None else steps - 1)
        generator = self._generator(seed, generator)
        t = torch.full((len(images),), float(strength), device=init.device)
        noised = add_noise(init, t, self.generator.num_labels, generator=generator)[0]
        tokens = self._run(prompts, negative_prompt, None, generator, dict(overrides, steps=steps,
                           renoise_steps=renoise), init_x=noised, t_start=float(strength), callback=callback)
        return self._finish(tokens, output)

    def variations(self, image, n=4, prompt='', strength=0.6, negative_prompt='', seed=None, generator=None,
                   output='pil', callback=None, **overrides):
        """n variations of one image. With a CLIP encoder in the pipeline (Paella v3): sampled from noise
        given the image's CLIP embedding (and ``prompt``). Otherwise: `edit` of the image's own tokens at
        ``strength`` (toward ``prompt``, empty by default) with n draws of the noise."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        image = load_image(image)
        if self.clip is None:
            return self.edit([image] * n, prompt, strength, negative_prompt, seed, generator, output,
                             callback, **overrides)
        embedding = self.clip.encode_images([image]).to(self.device)                # (1, D)
        tokens = self._run([prompt] * n, negative_prompt, seed, generator, overrides, callback=callback,
                           image_embeddings=embedding.expand(n, -1))
        return self._finish(tokens, output)

    def interpolate(self, prompt_a, prompt_b, n=5, method='linear', negative_prompt='', seed=0,
                    output='pil', callback=None, **overrides):
        """n images along the conditioning from prompt_a to prompt_b ('linear' or 'slerp'), all sampled
        with the same seed, so the first and the last are exactly plain generation from each prompt."""
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"n must be an integer >= 2, got {n!r}")
        if method not in ('linear', 'slerp'):
            raise ValueError(f"method must be 'linear' or 'slerp', got {method!r}")
        if not isinstance(prompt_a, str) or not isinstance(prompt_b, str):
            raise ValueError("prompt_a and prompt_b must be strings")
        if seed is None:
            seed = int(torch.seed() % 2 ** 63)
        s = replace(self.settings, **overrides)
        ends = []
        for prompt in (prompt_a, prompt_b):
            g = self._generator(seed, None)
            ends.append((self.conditions([prompt], negative_prompt, s, g), g.get_state()))
        (cond_a, uncond, attn), state = ends[0]
        cond_b = ends[1][0][0]
        frames = []
        for alpha in torch.linspace(0, 1, n).tolist():
            g = self._generator(seed, None)
            g.set_state(state)       # the draws made by the prior (if any) are the same for either prompt
            frames.append(self._sample(mix_conditions(cond_a, cond_b, alpha, method), uncond, attn, 1, s, g,
                                       callback=callback))
        return self._finish(torch.cat(frames), output)

    def regional(self, regions, size=None, background='', negative_prompt='', num_images=1, seed=None,
                 generator=None, output='pil', callback=None, **overrides):
        """One image following several prompts, each in its region: ``regions`` is a list of (prompt, box)
        with box = (x0, y0, x1, y1) in pixels of the canvas, or (prompt, mask image / array of the canvas
        size). Pixels outside every region follow ``background``. ``size`` (W, H): the canvas (default the
        pipeline's). Logits are blended per token by the regions' coverage (overlaps share)."""
        if not isinstance(regions, (list, tuple)) or not regions:
            raise ValueError("regions must be a non-empty list of (prompt, box or mask)")
        if not all(isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) for r in regions):
            raise ValueError("each region must be a pair (prompt, box or mask)")
        size = tuple(size or self.image_size)
        m, f = self.pixel_multiple, self.vqgan.downsampling
        if len(size) != 2 or size[0] % m or size[1] % m or min(size) <= 0:
            raise ValueError(f"size must be (width, height) with multiples of {m}, got {size!r}")
        masks = [region_mask(box, size) for _, box in regions]
        prompts = [p for p, _ in regions]
        covered = np.any(masks, axis=0)
        if not covered.all():
            masks.append(~covered)
            prompts.append(background)
        # Per-token share of each region: the fraction of the token's pixels it covers, normalised.
        h, w = size[1] // f, size[0] // f
        cover = torch.stack([torch.from_numpy(mk).float().view(h, f, w, f).mean((1, 3)) for mk in masks])
        weights = cover / cover.sum(0, keepdim=True).clamp(min=1e-8)                   # (R, h, w)
        s = replace(self.settings, **overrides)
        generator = self._generator(seed, generator)
        cond, uncond, attn = self.conditions(prompts, negative_prompt, s, generator)    # cond: batch R
        b = num_images
        cond = {k: v.repeat_interleave(b, 0) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
        uncond = {k: v[:1].expand(b, *v.shape[1:]) if isinstance(v, torch.Tensor) else v
                  for k, v in uncond.items()}
        cond['regions'] = weights[:, None, None].to(self.device)                       # (R, 1, 1, h, w)
        tokens = self._sample(cond, uncond, attn, b, replace(s, latent_size=(h, w)), generator,
                              model=RegionalModel(self.generator), callback=callback)
        return self._finish(tokens, output)
