"""Small synthetic training data, made in the test."""
import json

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

COLOURS = {'red': (220, 30, 30), 'green': (30, 180, 60), 'blue': (40, 60, 220), 'yellow': (240, 210, 20)}
SHAPES = ('circle', 'square')


def shape_image(colour, shape, size=32):
    im = Image.new('RGB', (size, size), 'white')
    d = ImageDraw.Draw(im)
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    (d.ellipse if shape == 'circle' else d.rectangle)(box, fill=COLOURS[colour])
    return im


def image_folder(folder, size=32):
    """8 images (4 colours x 2 shapes) with .txt captions beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    for colour in COLOURS:
        for shape in SHAPES:
            shape_image(colour, shape, size).save(folder / f'{colour}_{shape}.png')
            (folder / f'{colour}_{shape}.txt').write_text(f'a {colour} {shape}')
    return folder


def preencoded_tokens(path, n=4, grid=8, codes=64, length=6, width=24, seed=0):
    """n random token grids, each with its own random 'text' states: a memorisation task."""
    g = torch.Generator().manual_seed(seed)
    save_file({'tokens': torch.randint(0, codes, (n, grid, grid), generator=g).to(torch.int16),
               'text': torch.randn(n, length, width, generator=g).half(),
               'text_mask': torch.ones(n, length, dtype=torch.bool),
               '_uncond_text': torch.zeros(1, length, width).half()},
              str(path), metadata={'paella': json.dumps({'captions': [f'caption {i}' for i in range(n)]})})
    return path


def preencoded_pairs(path, n=256, width=16, seed=0):
    """CLIP-like text / image embedding pairs related by a fixed smooth map."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(n, width, generator=g)
    w = torch.randn(width, width, generator=g) / width ** 0.5
    save_file({'clip_text': text, 'clip_image': torch.tanh(text @ w) * 2}, str(path))
    return path


def add_member(tar, name, data):
    import io
    import tarfile
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def jpeg_bytes(colour='red', shape='circle', size=48):
    import io
    buf = io.BytesIO()
    shape_image(colour, shape, size).save(buf, 'JPEG')
    return buf.getvalue()


def shards(folder, n_shards=2, size=48):
    """Tar shards in the img2dataset layout (jpg + txt + json); sample 0 of each shard has pwatermark 0.9."""
    import tarfile
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(n_shards):
        with tarfile.open(folder / f'shard-{shard:03d}.tar', 'w') as tar:
            for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
                key = f'{shard:03d}{i:04d}'
                add_member(tar, key + '.jpg', jpeg_bytes(colour, shape, size))
                add_member(tar, key + '.txt', f'a {colour} {shape}'.encode())
                meta = {'width': size, 'height': size, 'pwatermark': 0.9 if i == 0 else 0.1}
                add_member(tar, key + '.json', json.dumps(meta).encode())
    return str(folder / ('shard-{000..%03d}.tar' % (n_shards - 1)))


# The bad samples of `bad_shard`: key -> what skipped.log must say of it (None: kept, no caption needed).
BAD_SAMPLES = {'garbage': 'bad json', 'nulljson': 'json is null', 'nocaption': 'no caption',
               'emptyimage': 'empty file', 'truncated': 'corrupt', 'notimage': 'not an image',
               'tiny': 'too small', 'cutoff': 'cut off'}


def bad_shard(folder, size=48):
    """One shard of 8 good samples (as `shards`) and one of each `BAD_SAMPLES`, the last member cut in half
    (a truncated download). Returns its path."""
    import tarfile
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / 'bad-000.tar'
    meta = json.dumps({'width': size, 'height': size}).encode()
    good = jpeg_bytes('blue', 'square', size)
    with tarfile.open(path, 'w') as tar:
        for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
            for ext, data in (('jpg', jpeg_bytes(colour, shape, size)), ('txt', f'a {colour} {shape}'.encode()),
                              ('json', meta)):
                add_member(tar, f'good{i}.{ext}', data)
        tiny = jpeg_bytes(size=4)
        for key, jpg, txt, js in (('garbage', good, b'a blue square', b'{"width": 48, oops'),
                                  ('nulljson', good, b'a blue square', b'null'),
                                  ('nocaption', good, None, meta),
                                  ('emptyimage', b'', b'a blue square', meta),
                                  ('truncated', good[:200], b'a blue square', meta),
                                  ('notimage', b'I am not a picture', b'a blue square', meta),
                                  ('tiny', tiny, b'a blue square', meta),
                                  ('cutoff', good, b'a blue square', meta)):
            for ext, data in (('txt', txt), ('json', js), ('jpg', jpg)):     # the image last: the cut hits it
                if data is not None:
                    add_member(tar, f'{key}.{ext}', data)
    with tarfile.open(path) as tar:
        member = tar.getmember('cutoff.jpg')
        cut = member.offset_data + member.size // 2
    path.write_bytes(path.read_bytes()[:cut])
    return path
