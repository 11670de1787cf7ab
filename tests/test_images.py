"""One picture, one meaning: every loader decodes a transparent PNG the same way (composited on white, the
paper the emoji models were trained on)."""
import io

import numpy as np
from PIL import Image


def transparent_png():
    """A red disc on a fully transparent background, with a half-transparent ring: (PNG bytes, expected RGB)."""
    rgba = np.zeros((32, 32, 4), np.uint8)
    yy, xx = np.mgrid[:32, :32]
    r = np.hypot(yy - 16, xx - 16)
    rgba[r < 12] = (220, 30, 30, 255)
    rgba[(r >= 12) & (r < 14)] = (0, 0, 255, 128)
    buf = io.BytesIO()
    Image.fromarray(rgba, 'RGBA').save(buf, 'PNG')
    a = rgba[..., 3:].astype(np.float64) / 255
    expected = np.round(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8)
    return buf.getvalue(), expected


def test_a_transparent_png_gives_the_same_pixels_through_every_loader(tmp_path):
    from paella.data import open_image
    from paella.images import load_image
    from paella.serve.limits import Fields, Limits
    data, expected = transparent_png()
    path = tmp_path / 'disc.png'
    path.write_bytes(data)
    decoded = {
        'training (data.open_image)': open_image(data),
        'editing, from bytes': load_image(data),
        'editing, from a path': load_image(path),
        'editing, from a PIL image': load_image(Image.open(path)),
        'paella serve upload': Fields(Limits()).image(data),
    }
    for name, im in decoded.items():
        got = np.asarray(im)
        assert im.mode == 'RGB' and np.abs(got.astype(int) - expected).max() <= 1, name
    assert (np.asarray(decoded['editing, from bytes'])[0, 0] == 255).all()          # a corner: white paper


def test_the_pipeline_encodes_a_transparent_png_as_its_white_version():
    import torch
    from paella.pipeline import Pipeline
    data, expected = transparent_png()
    pipe = Pipeline.from_pretrained(dtype=torch.float32)
    white = Image.fromarray(expected)
    assert pipe.encode_images([data], size=(32, 32)).equal(pipe.encode_images([white], size=(32, 32)))


def test_a_mask_file_is_read_as_drawn(tmp_path):
    """A transparent pixel of a mask is unpainted (kept), from a file as from a PIL image: masks are not
    composited on white like pictures."""
    from paella.editing import load_mask
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, 8:] = 255                                            # right half opaque white, left transparent
    im = Image.fromarray(rgba, 'RGBA')
    im.save(tmp_path / 'mask.png')
    from_file, from_pil = load_mask(tmp_path / 'mask.png', (16, 16)), load_mask(im, (16, 16))
    assert from_file.mean() == 0.5 and (from_file == from_pil).all()


# -- one loader for every input a person can give ---------------------------------------------------------

import struct  # noqa: E402
import warnings  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402


def png(width, height, depth, colour, rows):
    """PNG bytes written by hand (Pillow cannot write 16-bit RGB, nor a lying header): ``rows`` is the raw
    pixel data, one filter byte (0) added before each row."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    raw = b''.join(b'\0' + row for row in rows)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, depth, colour, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


def saved(im, fmt='PNG', **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def pixels(image, what='image'):
    from paella.images import load_image
    im = load_image(image, what)
    assert im.mode == 'RGB'
    return np.asarray(im).astype(int)


@pytest.mark.parametrize('side', [(20000, 20000), (9000, 9000), (10000, 10000), (8193, 1), (1, 100000)])
def test_an_oversized_image_is_refused_from_its_header_in_one_line(tmp_path, side):
    """20000x20000 is past Pillow's DecompressionBombError, 10000x10000 in its warning zone, 9000x9000 under
    both: each is the same one-line ValueError naming the size and the limit, with no warning, before a
    pixel is decoded (the pixel data here is 1 row: decoding would fail as 'not readable')."""
    from paella.images import MAX_SIDE, load_image, open_image_as_is
    w, h = side
    data = png(w, h, 8, 0, [b'\0' * w])
    (tmp_path / 'x.png').write_bytes(data)
    message = f"is {w}x{h} pixels; the limit is {MAX_SIDE} pixels per side"
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for image, name in ((data, 'image'), (tmp_path / 'x.png', f'image {tmp_path / "x.png"}')):
            with pytest.raises(ValueError, match=f'^{name} {message}$'):
                load_image(image)
        with pytest.raises(ValueError, match=f'^mask {message}$'):
            open_image_as_is(data, 'mask')


def test_a_pil_image_given_directly_is_checked_too():
    from paella.images import MAX_SIDE, load_image
    with pytest.raises(ValueError, match=f'is {MAX_SIDE + 1}x2 pixels; the limit is {MAX_SIDE}'):
        load_image(Image.new('1', (MAX_SIDE + 1, 2)))
    assert load_image(Image.new('L', (MAX_SIDE, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_sixteen_bit_images_are_scaled_not_clipped():
    """A 16-bit greyscale gradient comes out as the same gradient (Pillow's conversion clips it: 98% white),
    from a 16-bit PNG and from 'I;16', 'I;16B' and 'I' images; 16-bit RGB and float images likewise."""
    v = np.linspace(0, 65535, 256).round().astype(np.uint16)[None].repeat(3, 0)          # (3, 256)
    expected = np.round(v / 257).astype(int)
    grey16 = png(256, 3, 16, 0, [row.astype('>u2').tobytes() for row in v])
    inputs = {'16-bit grey PNG': grey16,
              "'I;16'": Image.frombytes('I;16', (256, 3), v.astype('<u2').tobytes()),
              "'I;16B'": Image.frombytes('I;16B', (256, 3), v.astype('>u2').tobytes()),
              "'I'": Image.fromarray(v.astype(np.int32))}
    for name, image in inputs.items():
        got = pixels(image)
        assert (got == expected[..., None]).all(), name
    rgb16 = np.stack([v, v[:, ::-1], np.full_like(v, 32896)], -1)                       # (3, 256, 3)
    got = pixels(png(256, 3, 16, 2, [row.astype('>u2').tobytes() for row in rgb16]))
    assert np.abs(got - rgb16 / 257).max() <= 1                                          # Pillow keeps v >> 8
    ramp = np.linspace(0, 1, 256, dtype=np.float32)[None].repeat(2, 0)
    assert (pixels(Image.fromarray(ramp, 'F'))[..., 0] == np.round(ramp * 255)).all()     # floats in [0, 1]
    assert (pixels(Image.fromarray(ramp * 255, 'F'))[..., 0] == np.round(ramp * 255)).all()   # in [0, 255]


def test_palette_grey_and_cmyk_images_are_what_a_person_sees():
    """Each mode's image -> the RGB a viewer shows, transparency composited on white, pixel by pixel."""
    palette = [255, 0, 0, 0, 128, 0, 0, 0, 255] + [0] * (3 * 253)
    index = np.array([[0, 1, 2, 1]] * 2, np.uint8)
    p = Image.fromarray(index, 'P')
    p.putpalette(palette)
    red, green, blue, white = (255, 0, 0), (0, 128, 0), (0, 0, 255), (255, 255, 255)
    drawn = np.array([[red, green, blue, green]] * 2)
    see_through = np.array([[red, white, blue, white]] * 2)                # palette index 1 transparent
    half = Image.fromarray(np.array([[[255, 0, 0, 255], [0, 0, 255, 0], [0, 0, 0, 128]]], np.uint8), 'RGBA')
    cases = {
        'palette PNG': (saved(p), drawn),
        'palette PNG, index 1 transparent': (saved(p, transparency=1), see_through),
        'palette GIF, index 1 transparent': (saved(p, 'GIF', transparency=1), see_through),
        'palette PNG, alpha per entry': (saved(p, transparency=bytes([255, 0, 255])), see_through),
        'palette PNG, half-transparent entry': (saved(p, transparency=bytes([255, 128, 255])),
                                                np.array([[red, (127, 191, 127), blue, (127, 191, 127)]] * 2)),
        'RGBA PNG': (saved(half), np.array([[red, white, (127, 127, 127)]])),
        'LA PNG': (saved(Image.fromarray(np.array([[[0, 255], [0, 0], [200, 128]]], np.uint8), 'LA')),
                   np.array([[(0, 0, 0), white, (227, 227, 227)]])),
        'L PNG': (saved(Image.fromarray(np.array([[0, 100, 255]], np.uint8), 'L')),
                  np.array([[(0, 0, 0), (100, 100, 100), white]])),
        'L PNG, grey 100 transparent': (saved(Image.fromarray(np.array([[0, 100, 255]], np.uint8), 'L'),
                                              transparency=100), np.array([[(0, 0, 0), white, white]])),
        'RGB PNG, blue transparent': (saved(Image.fromarray(drawn.astype(np.uint8)), transparency=blue),
                                      np.array([[red, green, white, green]] * 2)),
        "'1' PNG": (saved(Image.fromarray(np.array([[0, 1, 1, 0]], bool))),
                    np.array([[(0, 0, 0), white, white, (0, 0, 0)]])),
        'CMYK image': (Image.fromarray(np.array([[[255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 0, 255],
                                                   [0, 0, 0, 0]]], np.uint8), 'CMYK'),
                       np.array([[(0, 255, 255), (255, 0, 255), (0, 0, 0), white]])),
    }
    for name, (image, expected) in cases.items():
        assert np.abs(pixels(image) - expected).max() <= 1, name


def test_a_cmyk_jpeg_is_its_colours():
    """A CMYK JPEG (as print software writes them): cyan, magenta, yellow and black blocks."""
    inks = [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255)]
    a = np.concatenate([np.full((16, 16, 4), ink, np.uint8) for ink in inks], 1)
    got = pixels(saved(Image.fromarray(a, 'CMYK'), 'JPEG', quality=95))
    for i, rgb in enumerate([(0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0)]):
        assert np.abs(got[4:12, 16 * i + 4:16 * i + 12] - rgb).max() <= 8, rgb


@pytest.mark.parametrize('fmt', ['GIF', 'PNG', 'WEBP'])
def test_an_animation_gives_its_first_frame_and_says_so(fmt):
    from PIL import features
    if fmt == 'WEBP' and not features.check('webp'):
        pytest.skip('Pillow without WebP')
    frames = [Image.new('RGB', (8, 8), c) for c in ('red', 'blue', 'green')]
    data = saved(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True)
    with pytest.warns(UserWarning, match=r'^image is animated \(3 frames\): the first frame is used$'):
        got = pixels(data)
    assert np.abs(got - (255, 0, 0)).max() <= 2


def test_a_photo_is_turned_upright_as_its_exif_says():
    """A camera held upright stores the picture sideways with EXIF orientation 6 (turn 90 degrees
    clockwise): the picture and a mask drawn on it both come out upright."""
    from paella.images import open_image_as_is
    sideways = np.zeros((8, 16, 3), np.uint8)
    sideways[:, :8] = (255, 0, 0)                                          # left half red: the top, upright
    exif = Image.Exif()
    exif[0x0112] = 6
    for fmt in ('JPEG', 'PNG'):
        data = saved(Image.fromarray(sideways), fmt, exif=exif, **({'quality': 95} if fmt == 'JPEG' else {}))
        got = pixels(data)
        assert got.shape == (16, 8, 3), fmt
        assert np.abs(got[:6] - (255, 0, 0)).max() <= 8 and np.abs(got[10:] - 0).max() <= 8, fmt
        assert open_image_as_is(data, 'mask').size == (8, 16)


def test_messages_say_what_is_wrong(tmp_path):
    from paella.images import load_image
    (tmp_path / 'notes.txt').write_text('not an image')
    cases = [(tmp_path, f'^image {tmp_path} is a directory, not an image file$'),
             (tmp_path / 'missing.png', f'^image {tmp_path / "missing.png"} does not exist$'),
             (tmp_path / 'notes.txt', 'notes.txt is not a readable image'),
             (b'', '^image is empty'),
             (b'GIF89a and then nothing', '^image is not a readable image'),
             (png(64, 64, 8, 0, [bytes(range(64))] * 64)[:100], '^image is not a readable image'),   # cut
             (3.5, '^image must be a PIL image, a file path, or the bytes of an image file .*; got float$')]
    for image, message in cases:
        with pytest.raises(ValueError, match=message):
            load_image(image)


# -- grid labels --------------------------------------------------------------------------------------------

def label_ink(label):
    """(dark pixels under the image, the sheet) of a one-image grid labelled ``label``."""
    from paella.images import grid_of
    sheet = grid_of([Image.new('RGB', (64, 64), 'white')] * 2, labels=[label, 'x'])
    a = np.asarray(sheet).astype(int)[64:, :sheet.width // 2]
    return (a.min(-1) < 128).sum(), sheet


def test_a_long_label_is_wrapped_not_cut():
    """A 40-character label is drawn in full over several lines (it was cut at 15 characters): its ink is
    about 40/15 of its first 15 characters', inside its own cell; the sheet grows to hold the lines."""
    label = 'a very long prompt about a small red fox'
    assert len(label) == 40
    full, sheet = label_ink(label)
    start, short_sheet = label_ink(label[:15])
    assert 2.2 < full / start < 3.2
    assert sheet.height > short_sheet.height
    assert label_ink('x' * 500)[1].height == sheet.height               # at most 3 lines, ending in '...'


def test_a_label_no_font_can_draw_is_named_not_silently_boxed():
    """'猫' has no glyph in the fonts at hand (no installed package ships a CJK font): a warning names it.
    Emoji are drawn by OpenMoji (a dependency), in colour; Cyrillic by a system font or else named."""
    from paella.images import _font_for
    if _font_for('猫') is None:
        with pytest.warns(UserWarning, match="no available font can draw '猫'"):
            label_ink('猫')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        _, sheet = label_ink('cat 🐱')
    a = np.asarray(sheet).astype(int)[64:, :sheet.width // 2]
    assert (a.max(-1) - a.min(-1) > 60).sum() > 10                     # coloured pixels: a real emoji
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ink, _ = label_ink('кот')
    with pytest.warns(UserWarning, match='no available font'):
        boxes, _ = label_ink('\U0010ffff' * 3)
    assert [str(w.message) for w in caught] or ink != boxes
