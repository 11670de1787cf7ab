"""Pictures in and out, one way everywhere: decoding (transparency composited on white), resize-and-crop,
grids, PSNR. Training, editing, serving and evaluation all use these, so a picture means the same thing to
each of them (the emoji the models learn from are drawn on white: a transparent pixel is white paper).
"""
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def flatten(im):
    """An RGB image, transparent parts composited on white (palette, greyscale, CMYK, 16-bit: plain RGB)."""
    if im.mode in ('RGBA', 'LA', 'PA') or (im.mode == 'P' and 'transparency' in im.info):
        im = im.convert('RGBA')
        return Image.alpha_composite(Image.new('RGBA', im.size, (255, 255, 255, 255)), im).convert('RGB')
    return im.convert('RGB')


def load_image(image, what='image'):
    """An RGB image from a PIL image, a path, or PNG/JPEG/... bytes; ValueError if it is not one."""
    return flatten(open_image_as_is(image, what))


def open_image_as_is(image, what='image'):
    """A PIL image (loaded, in its own mode) from a PIL image, a path or bytes; ValueError if it is not one.
    Masks are read this way: a transparent pixel of a mask is unpainted, not white."""
    from PIL import UnidentifiedImageError
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray)):
        source = io.BytesIO(image)
    elif isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise ValueError(f"{what} {image} does not exist")
        source = image
    else:
        raise ValueError(f"{what} must be a PIL image, a path or PNG/JPEG bytes, got {type(image).__name__}")
    try:
        with Image.open(source) as im:
            im.load()
            return im
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"{what} is not a readable image (PNG, JPEG, WebP, ...)") from None


def resize_crop(im, size, rng=None):
    """Resize the short side to ``size`` (bicubic), crop size x size (random with a numpy ``rng``, else
    centred). Returns a float tensor (3, size, size) in [0, 1]."""
    scale = size / min(im.size)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    im = im.resize((w, h), Image.BICUBIC)
    left = int(rng.integers(0, w - size + 1)) if rng is not None else (w - size) // 2
    top = int(rng.integers(0, h - size + 1)) if rng is not None else (h - size) // 2
    a = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def grid_of(images, cols=4, labels=None):
    """One white sheet with the images (all of one size) in rows of ``cols``, a label under each if given."""
    from PIL import ImageDraw
    cols = min(len(images), cols)
    rows = -(-len(images) // cols)
    w, h = images[0].size
    label_h = 14 if labels else 0
    cell_w = max(w, 100) if labels else w
    sheet = Image.new('RGB', (cols * cell_w, rows * (h + label_h)), 'white')
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        x, y = (i % cols) * cell_w, (i // cols) * (h + label_h)
        sheet.paste(im, (x + (cell_w - w) // 2, y))
        if labels:
            text = labels[i] if len(labels[i]) <= 16 else labels[i][:15] + '.'
            draw.text((x + cell_w // 2, y + h + 1), text, fill='black', anchor='ma')
    return sheet


def png_bytes(im):
    buf = io.BytesIO()
    im.save(buf, 'PNG')
    return buf.getvalue()


def psnr(a, b):
    """PSNR in dB between two PIL images."""
    x, y = (np.asarray(im.convert('RGB'), dtype=np.float64) / 255 for im in (a, b))
    return float(10 * np.log10(1 / max(((x - y) ** 2).mean(), 1e-10)))


def tokens_to_images(vq, tokens):
    """Token grids (B, h, w) -> list of PIL images."""
    with torch.no_grad():
        pixels = vq.decode_indices(tokens).float().clamp(0, 1)            # (B, 3, 4h, 4w)
    arrays = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def save_images(images, out, grid=False, labels=None, cols=4):
    """Write images to out (one image), to out's stem + _i (several), or one grid image (with a label
    under each image when labels are given); returns the paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if grid and len(images) > 1:
        images = [grid_of(images, cols, labels)]
    paths = [out] if len(images) == 1 else [out.with_name(f'{out.stem}_{i}{out.suffix}') for i in range(len(images))]
    for im, p in zip(images, paths):
        im.save(p)
    return paths
