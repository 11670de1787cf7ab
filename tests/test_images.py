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
