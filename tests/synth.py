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


def shards(folder, n_shards=2, size=48):
    """Tar shards in the img2dataset layout (jpg + txt + json); sample 0 of each shard has pwatermark 0.9."""
    import io
    import tarfile
    folder.mkdir(parents=True, exist_ok=True)

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    for shard in range(n_shards):
        with tarfile.open(folder / f'shard-{shard:03d}.tar', 'w') as tar:
            for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
                key = f'{shard:03d}{i:04d}'
                buf = io.BytesIO()
                shape_image(colour, shape, size).save(buf, 'JPEG')
                add(tar, key + '.jpg', buf.getvalue())
                add(tar, key + '.txt', f'a {colour} {shape}'.encode())
                meta = {'width': size, 'height': size, 'pwatermark': 0.9 if i == 0 else 0.1}
                add(tar, key + '.json', json.dumps(meta).encode())
    return str(folder / ('shard-{000..%03d}.tar' % (n_shards - 1)))
