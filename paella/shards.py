"""Webdataset tar shards (the img2dataset layout: ``KEY.jpg``, ``KEY.txt``, ``KEY.json``, ...), read and
written without webdataset's loop, so that every problem is seen and the seed decides everything.

`ShardStream` is the endless training stream: each reader (a process under torchrun, times its DataLoader
workers) reads its own share of every epoch's shard permutation (seeded by (seed, epoch)), through a
shuffle buffer seeded by (seed, reader): the same seed gives the same samples in the same order. A
missing shard, a cut-off shard, a sample with broken json: reported, never fatal. A stream that can
produce nothing (every sample filtered out or bad, every shard missing) raises `NoSamples`, one line
saying how many samples were read and why each class was dropped, after one full pass over the reader's
shards (or 50 s), instead of looping forever.
"""
import io
import itertools
import json
import os
import re
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch


class NoSamples(ValueError):
    """No sample can be produced. One line, also when re-raised from a DataLoader worker (which puts the
    worker's traceback in front of the message)."""

    def __str__(self):
        text = super().__str__().strip()
        return text.splitlines()[-1].split('NoSamples: ', 1)[-1] if text else text


def expand(urls):
    """Shard URLs from a brace pattern (``shard-{000..099}.tar``), a list, or several joined by '::'."""
    from braceexpand import braceexpand
    if isinstance(urls, (str, Path)):
        urls = str(urls).split('::')
    return [u for pattern in urls for u in braceexpand(str(pattern))]


def reader_of():
    """(this reader, readers): ranks x DataLoader workers, rank-major."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    info = torch.utils.data.get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    return rank * workers + worker, world * workers


def share(n, reader, readers, order=None):
    """Indices of ``n`` shards that ``reader`` reads: every ``readers``-th of ``order`` (default 0..n-1);
    with fewer shards than readers, one shard each (readers share shards)."""
    order = list(range(n)) if order is None else list(order)
    if n < readers:
        return [order[reader % n]] if n else []
    return order[reader::readers]


_KEY = re.compile(r'^((?:.*/|)[^./]+)\.([^/]*)$')     # key = the path up to the first dot of the file name


def open_url(url):
    """A binary stream: a local file, or webdataset's gopen for pipe:, http:, s3:, ... URLs."""
    if re.match(r'^[a-z0-9]+:', url) and not url.startswith('file:'):
        from webdataset import gopen
        return gopen(url)
    return open(url.removeprefix('file:'), 'rb')


class _Counted:
    """A read-only stream that counts the bytes read from it (to tell whether a tar really ended)."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def read(self, size=-1):
        data = self.f.read(size)
        self.n += len(data)
        return data


def read_shard(url):
    """The samples of one shard, in order: {'__key__', '__url__', EXT: bytes, ...}. A sample cut off by a
    truncated shard comes as {'__key__', '__url__', '__error__': why}; so does the last sample of a shard
    that ends without tar's end-of-archive blocks. OSError / tarfile.ReadError if it cannot be opened."""
    with open_url(url) as raw:
        counted = _Counted(raw)
        tar = tarfile.open(fileobj=counted, mode='r|*')
        sample, member = {}, None
        try:
            for member in tar:
                m = _KEY.match(member.name)
                if not member.isreg() or not m or os.path.basename(member.name).startswith('__'):
                    continue
                key, ext = m.group(1), m.group(2).lower()
                if sample and sample['__key__'] != key:
                    yield sample
                    sample = {}
                data = tar.extractfile(member).read()
                sample = sample or {'__key__': key, '__url__': url}
                sample[ext] = data
        except (tarfile.TarError, EOFError, OSError) as e:
            key = _KEY.match(member.name).group(1) if member is not None and _KEY.match(member.name) else '?'
            yield {'__key__': key, '__url__': url, '__error__': f'cut off: shard truncated in {member and member.name}'
                                                               f' ({type(e).__name__}: {e})'}
            return
        while counted.read(1 << 20):
            pass
        if sample and counted.n < tar.offset + 2 * tarfile.BLOCKSIZE:
            yield {**sample, '__error__': 'cut off: the shard ends without the tar end-of-archive blocks'}
        elif sample:
            yield sample


class Tally:
    """What a reader has read and why it dropped what it did (for `NoSamples`)."""

    def __init__(self):
        self.read = self.selected = self.kept = self.decoded = 0
        self.pass_size = None           # samples that passed the selection in the first full pass
        self.shards, self.unreadable, self.dropped = set(), {}, Counter()

    def error(self):
        parts = [f'{n} {why}' for why, n in self.dropped.most_common()]
        if self.unreadable:
            url, why = next(iter(self.unreadable.items()))
            parts.append(f'{len(self.unreadable)} shards unreadable ({url}: {why})')
        n = len(self.shards)
        return NoSamples(f"no usable sample: read {self.read} samples from {n} shard{'s' * (n != 1)}, kept 0: "
                         + ('; '.join(parts) or 'the shards hold no sample'))


def shuffled(items, size, rng):
    """A shuffle buffer of ``size`` items drawing from the numpy ``rng`` (size <= 1: the input order)."""
    buf = []
    for item in items:
        if size <= 1:
            yield item
        elif len(buf) < size:
            buf.append(item)
        else:
            j = int(rng.integers(len(buf)))
            yield buf[j]
            buf[j] = item
    for j in rng.permutation(len(buf)):
        yield buf[j]


class ShardStream(torch.utils.data.IterableDataset):
    """Samples of tar shards, endless (``resample``) or one pass. ``select(raw)`` runs on every raw sample
    before the shuffle buffer (cheap checks: json, filters, caption) and returns it, a skip record
    {'skip', 'name'} or the reason it is filtered out (a str); ``decode(raw, rng)`` runs after the buffer
    and returns a sample, a skip record or a reason. Skip records are yielded (the trainer logs them);
    filtered samples are only counted."""

    def __init__(self, urls, select, decode, seed=0, shuffle=1000, resample=True, extras=None, meta=None):
        self.urls = expand(urls)
        if not self.urls:
            raise ValueError(f"no shard URLs in {urls!r}")
        self.select, self.decode, self.seed, self.shuffle, self.resample = select, decode, seed, shuffle, resample
        self.extras, self.meta = extras or {}, meta or {}    # pre-encoded shards: the empty prompt's states, ...
        self.start = 0                  # set by resume(): a resumed run draws a fresh stream

    def resume(self, step):
        self.start = step

    def __iter__(self):
        reader, readers = reader_of()
        rng = np.random.default_rng([self.seed, reader, readers, self.start])
        tally = Tally()
        for item in shuffled(self._selected(reader, readers, tally), self.shuffle, rng):
            out = item if 'skip' in item else self.decode(item, rng)      # skip records were counted before
            if out is not item:
                tally.decoded += 1
                if isinstance(out, str):
                    tally.dropped[out] += 1
                elif 'skip' in out:
                    tally.dropped[out['skip'].split(' (')[0]] += 1
                else:
                    tally.kept += 1
                if not tally.kept and tally.pass_size is not None and tally.decoded >= tally.pass_size:
                    raise tally.error()
            if not isinstance(out, str):
                yield out

    def _selected(self, reader, readers, tally):
        t0 = time.monotonic()
        for epoch in itertools.count():
            order = np.random.default_rng([self.seed, epoch, self.start]).permutation(len(self.urls))
            passed = 0
            for url in (self.urls[i] for i in share(len(self.urls), reader, readers, order.tolist())):
                tally.shards.add(url)
                try:
                    for raw in read_shard(url):
                        tally.read += 1
                        out = self.select(raw)
                        if isinstance(out, str) or 'skip' in out:
                            tally.dropped[out if isinstance(out, str) else out['skip'].split(' (')[0]] += 1
                        passed += not isinstance(out, str) and 'skip' not in out
                        if not isinstance(out, str):
                            yield out
                        # 50 s of samples that all fail the cheap checks: stop before a long first pass ends
                        if not (tally.kept or tally.selected + passed) and time.monotonic() - t0 > 50:
                            raise tally.error()
                except (OSError, tarfile.TarError) as e:
                    if url not in tally.unreadable:     # reported once: a missing shard is met every epoch
                        tally.unreadable[url] = why = getattr(e, 'strerror', None) or f'{type(e).__name__}: {e}'
                        yield {'skip': f'shard unreadable ({why})', 'name': url}
            tally.selected += passed
            if tally.pass_size is None:
                tally.pass_size = passed
                if not passed and not tally.kept:
                    raise tally.error()
            if not self.resample:
                return


EXTRAS = 'extras.safetensors'       # beside pre-encoded shards: the empty prompt's states, the settings


def preencoded_extras(urls):
    """({'uncond_text', 'uncond_clip'}, metadata) of the `paella preencode` shards ``urls`` (the EXTRAS
    file beside the first shard), or ({}, {}) for other shards."""
    first = expand(urls)[0] if not str(urls).startswith('pipe:') else ''
    path = Path(first).parent / EXTRAS if first else None
    if path is None or not path.is_file():
        return {}, {}
    from safetensors import safe_open
    with safe_open(str(path), framework='pt') as f:
        return {k[1:]: f.get_tensor(k) for k in f.keys()}, json.loads((f.metadata() or {}).get('paella', '{}'))


def write_shard(path, samples):
    """Write {'__key__', EXT: bytes, ...} samples (an iterable, consumed as written) as a tar shard,
    atomically (a temporary file beside it, then a rename) and byte-reproducibly (fixed times, modes and
    owners). Returns the number of samples."""
    from .checkpoint import atomic_write
    count = 0

    def write(tmp):
        nonlocal count
        with tarfile.open(tmp, 'w', format=tarfile.USTAR_FORMAT) as tar:
            for count, sample in enumerate(samples, 1):
                for ext, data in sample.items():
                    if not ext.startswith('__'):
                        info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                        info.size, info.mtime, info.mode = len(data), 0, 0o644
                        tar.addfile(info, io.BytesIO(data))
    atomic_write(path, write)
    return count
