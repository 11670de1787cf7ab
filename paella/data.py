"""Training data: image folders with captions, webdataset tar shards, and pre-encoded tensors.

Images are decoded with Pillow, converted to RGB, resized (short side) and cropped with numpy. A bad
sample (truncated, empty, not an image, too small, a decompression bomb, ...) never stops training: it
comes back as ``{'skip': reason, 'name': ...}`` so the trainer can count and report it. Random crops are
seeded by (seed, epoch, index), so a sample looks the same whichever worker or process loads it.

Shards (`webdataset_images`): the tar reading and the seeded stream are paella.shards; here, what a shard
sample must pass (json that parses to an object, the LAION filters, a caption where one is needed, an
image or pre-encoded members) and how it is decoded. A bad one is a skip record named ``SHARD#KEY``.
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
from .shards import EXTRAS, NoSamples, ShardStream, preencoded_extras  # noqa: F401  (re-exported)

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
    if data is None:                # "text": null in a metadata file
        return '', None
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
        if 'shards' in self.meta:
            raise ValueError(f"{path} describes pre-encoded shards: train on the shards, --data "
                             f"'{Path(path).parent / self.meta['shards']}'")
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
        if isinstance(vals[0], torch.Tensor) and len({v.shape for v in vals}) > 1:     # text states of
            n = max(len(v) for v in vals)                          # several lengths: zero padded to the longest
            vals = [torch.cat([v, v.new_zeros(n - len(v), *v.shape[1:])]) for v in vals]
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


def _number(meta, key):
    """meta[key] as a float; None where missing, null, NaN or not a number (a score that cannot be checked)."""
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        return None
    return float(v)


def webdataset_filter(min_size=0, max_watermark=1.0, min_aesthetic=None, max_unsafe=1.0, min_caption_chars=1,
                      max_caption_chars=None):
    """The published LAION filters, on a sample's json metadata (img2dataset's) and caption: returns
    ``check(meta, caption) -> None (kept) or the reason it is filtered out``; caption None: not checked.

    One rule for every field: a filter that is set drops a sample whose json lacks its field (or holds
    null / NaN), since it cannot be checked; a filter left at its default never reads it. The size is the
    exception only in where it comes from: without original_width/height (or width/height) in the json the
    decoded image's own size is compared (`decode_shard_sample`)."""
    scores = [('pwatermark', 'max_watermark', max_watermark, max_watermark < 1.0, lambda v, t: v > t, 'above'),
              ('punsafe', 'max_unsafe', max_unsafe, max_unsafe < 1.0, lambda v, t: v > t, 'above'),
              ('aesthetic', 'min_aesthetic', min_aesthetic, min_aesthetic is not None, lambda v, t: v < t, 'below')]

    def check(meta, caption):
        w = _number(meta, 'original_width') or _number(meta, 'width')
        h = _number(meta, 'original_height') or _number(meta, 'height')
        if min_size and w is not None and h is not None and min(w, h) < min_size:
            return f'smaller than min_size {min_size}'
        for key, flag, limit, active, fails, word in scores:
            if active and _number(meta, key) is None:
                return f'without {key} ({flag} {limit})'
            if active and fails(_number(meta, key), limit):
                return f'{key} {word} {flag} {limit}'
        if caption is not None and len(caption) < min_caption_chars:
            return f'caption shorter than min_caption_chars {min_caption_chars}'
        if caption is not None and max_caption_chars is not None and len(caption) > max_caption_chars:
            return f'caption longer than max_caption_chars {max_caption_chars}'
        return None
    check.min_size = min_size
    return check


def is_shards(data):
    """Webdataset shard URLs: a .tar file, a brace pattern (shard-{000..009}.tar) or a pipe: command."""
    return str(data).startswith('pipe:') or '.tar' in str(data)


SHARD_IMAGES = ('jpg', 'jpeg', 'png', 'webp')
PREENCODED = ('tokens.npy', 'text.npy', 'text_mask.npy', 'clip_text.npy', 'clip_image.npy')   # paella preencode


def select_shard_sample(raw, check, captions=True):
    """The cheap checks on a raw shard sample, before the shuffle buffer: the raw sample (with its json
    as '_meta', its caption as '_text'), a skip record {'skip', 'name'} (a broken sample: logged), or the
    filter's reason (a str: counted, not logged)."""
    name = f"{raw['__url__']}#{raw['__key__']}"
    if '__error__' in raw:
        return {'skip': raw['__error__'], 'name': name}
    meta = {}
    if 'json' in raw:
        try:
            meta = json.loads(raw['json'])
        except (ValueError, RecursionError) as e:    # JSONDecodeError, UnicodeDecodeError, nested too deeply
            return {'skip': f'bad json ({type(e).__name__}: {str(e)[:80]})', 'name': name}
        if not isinstance(meta, dict):
            return {'skip': f'json is {json.dumps(meta)[:20]}, not an object', 'name': name}
    text, note = decode_caption(raw['txt']) if 'txt' in raw else ('', None)
    if captions and not text:
        return {'skip': 'no caption', 'name': name}
    why = check(meta, text if captions else None)
    if why:
        return why
    if not any(k in raw for k in SHARD_IMAGES + ('tokens.npy',)):
        return {'skip': 'no image in sample', 'name': name}
    return {**raw, '_meta': meta, '_text': text, '_note': note, '_name': name}


def decode_shard_sample(raw, rng, image_size, min_size=0):
    """A selected raw sample -> {'image' (3, S, S) in [0, 1], 'caption', 'name', 'note'}, or with
    pre-encoded members {'tokens' (h, w) int16, 'text' (L, D) fp16, 'text_mask' (L,), ['clip_text',
    'clip_image'], ...}; a skip record for a bad image; the reason (a str) for an image under min_size.
    ``rng``: numpy, for the random crop (None: centred)."""
    out = {'caption': raw['_text'], 'name': raw['_name'], 'note': raw['_note']}
    if 'tokens.npy' in raw:
        for k in (k for k in PREENCODED if k in raw):
            try:
                out[k[:-4]] = torch.from_numpy(np.load(io.BytesIO(raw[k]), allow_pickle=False))
            except (ValueError, OSError, EOFError, TypeError) as e:    # a damaged or object array
                return {'skip': f'bad {k} ({type(e).__name__})', 'name': raw['_name']}
        return out
    data = raw[next(k for k in SHARD_IMAGES if k in raw)]
    try:
        im = open_image(data, image_size // 2)
    except BadSample as e:
        return {'skip': str(e), 'name': raw['_name']}
    meta = raw['_meta']
    sized = (_number(meta, 'original_width') or _number(meta, 'width')) is not None and \
        (_number(meta, 'original_height') or _number(meta, 'height')) is not None
    if min_size and not sized and min(im.size) < min_size:
        return f'smaller than min_size {min_size}'
    return {'image': resize_crop(im, image_size, rng), **out}


def webdataset_images(urls, image_size=256, seed=0, shuffle=1000, captions=True, random_crop=True,
                      resample=True, **filters):
    """An endless stream (`ShardStream`) of samples from tar shards in the img2dataset layout (jpg/png +
    txt + json), or of `paella preencode` shards (tokens.npy + text.npy + ...): every epoch a permutation
    of the shards seeded by (seed, epoch), each reader (rank x worker) its share, a shuffle buffer seeded by
    (seed, reader), filtered by `webdataset_filter(**filters)`. captions=False (the VQGAN) keeps images
    without a caption; with captions they are skipped and reported."""
    check = webdataset_filter(**filters)
    extras, meta = preencoded_extras(urls)
    return ShardStream(urls, lambda raw: select_shard_sample(raw, check, captions),
                       lambda raw, rng: decode_shard_sample(raw, rng if random_crop else None, image_size,
                                                            check.min_size),
                       seed=seed, shuffle=shuffle, resample=resample, extras=extras, meta=meta)
