"""Training data: image folders with captions, webdataset tar shards, and pre-encoded tensors.

Images are decoded with Pillow, converted to RGB, resized (short side) and cropped with numpy. A bad
sample (truncated, empty, not an image, too small, a decompression bomb, ...) never stops training: it
comes back as ``{'skip': reason, 'name': ...}`` so the trainer can count and report it. Random crops are
seeded by (seed, epoch, index), so a sample looks the same whichever worker or process loads it.
"""
import csv
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import flatten, resize_crop

IMAGE_EXTS = {'.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff'}
MAX_PIXELS = 64_000_000          # larger images are skipped as potential decompression bombs


class BadSample(Exception):
    pass


def open_image(source, min_size=1, max_pixels=MAX_PIXELS):
    """Decode a path or bytes into an RGB PIL image, or raise BadSample with the reason."""
    try:
        data = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    except OSError as e:
        raise BadSample(f'unreadable ({e.strerror})') from None
    if not data:
        raise BadSample('empty file')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > max_pixels:
                raise BadSample(f'too large ({im.width}x{im.height})')
            im.load()
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadSample('too large (decompression bomb)') from None
    except Exception as e:      # Pillow raises many types for broken files
        kind = 'not an image' if 'cannot identify' in str(e) else f'corrupt ({type(e).__name__}: {e})'
        raise BadSample(kind) from None
    if min(im.size) < min_size:
        raise BadSample(f'too small ({im.width}x{im.height})')
    return flatten(im)              # transparency on white; CMYK, greyscale, palette, 16-bit -> RGB


def decode_caption(data):
    """Caption text from bytes: UTF-8, else Latin-1 (flagged). Returns (text, note or None)."""
    if isinstance(data, str):
        return data.strip(), None
    try:
        return data.decode('utf-8').strip(), None
    except UnicodeDecodeError:
        return data.decode('latin-1').strip(), 'caption not UTF-8 (read as Latin-1)'


def _sample_rng(seed, epoch, index):
    return np.random.default_rng([seed, epoch, index])


class ImageFolder(torch.utils.data.Dataset):
    """Images under ``root`` with captions from ``metadata.jsonl`` / ``metadata.csv`` (file_name + text or
    caption; an image listed on several rows is one sample per row), or a ``.txt`` beside each image (empty
    caption if none). Items are (epoch, index) pairs."""

    def __init__(self, root, image_size=256, random_crop=True, seed=0, min_size=None):
        self.root, self.image_size, self.random_crop, self.seed = Path(root), image_size, random_crop, seed
        self.min_size = min_size or image_size // 2
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        rows = self._metadata()
        files = sorted(p for p in self.root.rglob('*') if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        captions = None
        if rows is not None:
            rows = sorted(rows, key=lambda r: r[0])          # stable: a file's rows keep their order
            files, captions = [self.root / name for name, _ in rows], [c for _, c in rows]
        if not files:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found in {self.root}")
        self.files, self.captions = files, captions

    def _metadata(self):
        jsonl, csv_path = self.root / 'metadata.jsonl', self.root / 'metadata.csv'
        if jsonl.is_file():
            rows = [json.loads(line) for line in jsonl.read_text(encoding='utf-8').splitlines() if line.strip()]
        elif csv_path.is_file():
            with open(csv_path, newline='', encoding='utf-8') as f:
                rows = list(csv.DictReader(f))
        else:
            return None
        return [(r['file_name'], r.get('text', r.get('caption', ''))) for r in rows]

    def __len__(self):
        return len(self.files)

    def caption(self, i):
        if self.captions is not None:
            return decode_caption(self.captions[i])
        txt = self.files[i].with_suffix('.txt')
        return decode_caption(txt.read_bytes()) if txt.is_file() else ('', None)

    def __getitem__(self, item):
        epoch, i = item if isinstance(item, tuple) else (0, item)
        name = self.files[i].relative_to(self.root).as_posix()
        try:
            im = open_image(self.files[i], self.min_size)
        except BadSample as e:
            return {'skip': str(e), 'name': name}
        rng = _sample_rng(self.seed, epoch, i) if self.random_crop else None
        text, note = self.caption(i)
        return {'image': resize_crop(im, self.image_size, rng), 'caption': text, 'name': name, 'note': note}


class Preencoded(torch.utils.data.Dataset):
    """Tensors of a ``paella preencode`` file: every row of every tensor is one sample."""

    def __init__(self, path):
        from safetensors import safe_open
        with safe_open(str(path), framework='pt') as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            self.meta = json.loads((f.metadata() or {}).get('paella', '{}'))
        # Keys starting with '_' are not per sample (e.g. '_uncond_text', the empty prompt's states).
        self.extras = {k[1:]: v for k, v in tensors.items() if k.startswith('_')}
        self.tensors = {k: v for k, v in tensors.items() if not k.startswith('_')}
        sizes = {len(v) for v in self.tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"{path}: tensors have different numbers of rows {sizes}")
        self.n = sizes.pop()

    def __len__(self):
        return self.n

    def __getitem__(self, item):
        _, i = item if isinstance(item, tuple) else (0, item)
        return {k: v[i] for k, v in self.tensors.items()}


def collate(samples):
    """Stack good samples; bad ones are returned apart as (name, reason) for the log."""
    good = [s for s in samples if 'skip' not in s]
    skipped = [(s['name'], s['skip']) for s in samples if 'skip' in s]
    notes = [(s['name'], s['note']) for s in good if s.get('note')]
    batch = {}
    for k in (good[0] if good else {}):
        if k in ('note',):
            continue
        vals = [s[k] for s in good]
        batch[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return batch, skipped + notes


class StepSampler(torch.utils.data.Sampler):
    """Index batches that are a pure function of (seed, position): epoch e is ``randperm(n)`` seeded by
    (seed, e); the global batch at position p is the next ``global_batch`` indices; each rank takes its
    contiguous slice. Resuming at position p reproduces the same batches, on any number of processes."""

    def __init__(self, n, global_batch, rank=0, world=1, seed=0, start=0, shuffle=True):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by the {world} processes")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start, self.shuffle = seed, start, shuffle

    def _perm(self, epoch):
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))

    def __iter__(self):
        local = self.global_batch // self.world
        pos = self.start * self.global_batch        # first sample of the stream, counted over epochs
        epoch, perm = None, None
        while True:
            batch = []
            for k in range(pos + self.rank * local, pos + (self.rank + 1) * local):
                e, i = divmod(k, self.n)
                if e != epoch:
                    epoch, perm = e, self._perm(e)
                batch.append((e, int(perm[i])))
            yield batch
            pos += self.global_batch


def webdataset_filter(min_size=0, max_watermark=1.0, min_aesthetic=None, max_unsafe=1.0, min_caption_chars=1,
                      max_caption_chars=None):
    """The published LAION filters, on a sample's json metadata and caption."""
    def keep(sample):
        meta = sample.get('json') or {}
        if isinstance(meta, (bytes, str)):
            meta = json.loads(meta)
        w, h = meta.get('original_width', meta.get('width')), meta.get('original_height', meta.get('height'))
        if min_size and w is not None and h is not None and min(w, h) < min_size:
            return False
        if (meta.get('pwatermark') or 0.0) > max_watermark or (meta.get('punsafe') or 0.0) > max_unsafe:
            return False
        if min_aesthetic is not None and (meta.get('aesthetic') or 0.0) < min_aesthetic:
            return False
        text, _ = decode_caption(sample.get('txt', b''))
        return len(text) >= min_caption_chars and (max_caption_chars is None or len(text) <= max_caption_chars)
    return keep


def is_shards(data):
    """Webdataset shard URLs: a .tar file, a brace pattern (shard-{000..009}.tar) or a pipe: command."""
    return str(data).startswith('pipe:') or '.tar' in str(data)


def webdataset_images(urls, image_size=256, seed=0, shuffle=1000, **filters):
    """An endless stream of samples from tar shards in the img2dataset layout (jpg/png + txt + json):
    shards resampled with replacement per worker and node, samples shuffled in a buffer, filtered."""
    import webdataset as wds
    rng = np.random.default_rng(seed)

    def decode(sample):
        name = sample.get('__key__', '?')
        data = sample.get('jpg') or sample.get('png') or sample.get('webp') or sample.get('jpeg')
        try:
            if data is None:
                raise BadSample('no image in sample')
            im = open_image(data, image_size // 2)
        except BadSample as e:
            return {'skip': str(e), 'name': name}
        text, note = decode_caption(sample.get('txt', b''))
        return {'image': resize_crop(im, image_size, rng), 'caption': text, 'name': name, 'note': note}

    return (wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=wds.split_by_node,
                           handler=wds.warn_and_continue, seed=seed)
            .select(webdataset_filter(**filters)).shuffle(shuffle).map(decode))
