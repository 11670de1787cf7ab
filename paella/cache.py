"""Embeddings kept on disk: one small safetensors file per (encoder, prompt or image), keyed by a hash of
both, so that an encoder runs once per item ever (training captions; ByT5-XL's states in low memory)."""
import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import torch

from .checkpoint import atomic_write


class Encoded(NamedTuple):
    states: torch.Tensor    # (B, L, D), zero at padding
    mask: torch.Tensor      # (B, L) bool, True on real tokens


def collate(rows, pad_to=None):
    """Stack per-prompt (L_i, D) states into Encoded (B, L, D) with zero padding."""
    length = max(pad_to or 0, max(r.shape[0] for r in rows))
    states = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        states[i, :len(r)], mask[i, :len(r)] = r, True
    return Encoded(states, mask)


def default_cache_folder():
    """Where embeddings are cached by default: $PAELLA_CACHE, else paella/embeddings in the user's cache
    folder ($XDG_CACHE_HOME or ~/.cache)."""
    if os.environ.get('PAELLA_CACHE'):
        return Path(os.environ['PAELLA_CACHE'])
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'paella' / 'embeddings'


class EmbeddingCache:
    """Embeddings on disk, one small safetensors file per (encoder, item), keyed by a hash of both.

    Training encodes every caption (and image) once; later epochs and runs read the files.
    ``hits`` / ``misses`` count lookups.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.hits = self.misses = 0

    def _path(self, encoder_id, kind, item):
        data = item.encode('utf-8') if isinstance(item, str) else bytes(item)
        h = hashlib.sha256(f'{encoder_id}\0{kind}\0'.encode() + data).hexdigest()
        return self.folder / h[:2] / f'{h}.safetensors'

    def _get(self, encoder_id, kind, items, compute):
        from safetensors.torch import load_file, save_file
        paths = [self._path(encoder_id, kind, it) for it in items]
        # Each missing item computed once, however often the batch holds it (the negative prompt, B times).
        todo = {p: it for p, it in zip(paths, items) if not p.is_file()}
        if todo:
            for path, tensor in zip(todo, compute(list(todo.values()))):
                path.parent.mkdir(parents=True, exist_ok=True)
                x = tensor.detach().float().cpu().contiguous()
                atomic_write(path, lambda p: save_file({'x': x}, p))   # a crash never leaves half an entry
        self.misses += len(todo)
        self.hits += len(items) - len(todo)
        return [load_file(str(p))['x'] for p in paths]

    def text(self, encoder, prompts):
        """Encoded (B, L, D) for a token-level text encoder, through the cache."""
        def compute(batch):
            states, mask = encoder.encode(batch)
            return [s[m] for s, m in zip(states, mask)]     # keep each prompt's real tokens only
        return collate(self._get(encoder.id, 'text', prompts, compute), encoder.pad_to)

    def clip_text(self, encoder, prompts):
        """(B, D) CLIP text embeddings through the cache."""
        return torch.stack(self._get(encoder.id, 'clip_text', prompts, lambda b: list(encoder.encode_text(b))))

    def clip_images(self, encoder, images, keys):
        """(B, D) CLIP image embeddings through the cache; ``keys`` are the images' bytes (e.g. file contents)."""
        by_key = dict(zip(keys, images))
        def compute(ks):
            return list(encoder.encode_images([by_key[k] for k in ks]))
        return torch.stack(self._get(encoder.id, 'clip_image', keys, compute))
