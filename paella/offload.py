"""Low memory: weights read a few at a time, blocks that stay on disk until their forward, models loaded
for one use and released after.

Paella v3 needs four large models: ByT5-XL's encoder (2.6B parameters, 10.4 GB in float32), CLIP-H, the
prior and the generator (about 1B each). The published demo holds all of them at once ("at least 30GB of
RAM"). Low memory (`Pipeline.from_pretrained(..., low_memory=True)`, the default where RAM is short) runs
the same computation with only one of them in memory at a time:

- `Weights` reads tensors by name from a safetensors or PyTorch file (or a sharded folder), converting each
  to the compute dtype as it is read and closing the file every 512 MB: a file is memory-mapped,
  and the pages it touched count as resident until it is closed, so reading a whole 10 GB file through one
  mapping would hold 10 GB however little is kept;
- `stream` runs a module whose blocks (ByT5's 36 layers) are read from disk just before their forward and
  dropped right after: a text encoder of any size in the memory of one block;
- `OnDemand` is a model (the prior, CLIP) loaded for each use, ``with using(model) as m:``, and released
  after.
"""
import ctypes
import gc
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

CHUNK_BYTES = 512 * 2 ** 20         # file bytes read through one mapping before it is closed (one ByT5-XL block: 290 MB)


class Weights:
    """Tensors by name from weights files: ``read(names, dtype)`` -> {name: tensor}, each a copy of its own
    (no reference into the file remains), floating tensors converted to ``dtype``."""

    def __init__(self, files):
        self.files, self.where = list(files), {}         # where: name -> file
        for f in files:
            for name in _names(f):
                self.where[name] = f

    @classmethod
    def of(cls, path):
        """A weights file, or a transformers folder (model.safetensors, pytorch_model.bin, or a sharded
        index of either)."""
        path = Path(path)
        if path.is_file():
            return cls([path])
        for name in ('model.safetensors', 'pytorch_model.bin'):
            if (path / name).is_file():
                return cls([path / name])
            index = path / f'{name}.index.json'
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text())['weight_map'].values()))
                return cls([path / s for s in shards])
        raise FileNotFoundError(f"{path} holds no model.safetensors or pytorch_model.bin (nor a sharded index)")

    def __contains__(self, name):
        return name in self.where

    def read(self, names, dtype=None):
        by_file = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for file, group in by_file.items():
            out.update(_read(file, group, dtype))
        return out


def _names(file):
    if file.suffix == '.safetensors':
        from safetensors import safe_open
        with safe_open(str(file), framework='pt') as f:
            return list(f.keys())
    return list(_torch_load(file))


def _zipped(file):
    with open(file, 'rb') as f:
        return f.read(2) == b'PK'


def _torch_load(file):
    # mmap: nothing is read until a tensor is touched (zip files; an old-style pickle loads whole).
    obj = torch.load(file, map_location='cpu', weights_only=True, mmap=_zipped(file))
    return obj['state_dict'] if isinstance(obj.get('state_dict'), dict) else obj


def _read(file, names, dtype):
    """{name: tensor} for names of one file, through a fresh mapping every CHUNK_BYTES of the file (both
    safetensors and torch.load(mmap=True) give tensors that are views of one mapping of the whole file)."""
    out, todo = {}, list(names)
    chunk = CHUNK_BYTES if file.suffix == '.safetensors' or _zipped(file) else float('inf')
    while todo:
        if file.suffix == '.safetensors':
            from safetensors import safe_open
            with safe_open(str(file), framework='pt') as f:
                todo = _take(f.get_tensor, todo, out, dtype, chunk)
        else:
            sd = _torch_load(file)
            todo = _take(sd.__getitem__, todo, out, dtype, chunk)
            del sd
    return out


def _take(get, names, out, dtype, chunk):
    """Copy (and convert) tensors of ``names`` into ``out`` until ``chunk`` bytes were read; the names left."""
    read = 0
    for i, name in enumerate(names):
        if read >= chunk:
            return names[i:]
        t = get(name)
        read += t.numel() * t.element_size()
        out[name] = t.to(dtype, copy=True) if dtype is not None and t.is_floating_point() else t.clone()
    return []


def materialize(module, weights, prefix='', dtype=None, device=None, aliases=None):
    """Give a module built on the meta device its weights: every state-dict entry of ``module`` from
    ``weights`` under ``prefix``; ``aliases`` maps a name to another to try (tied embeddings)."""
    names = list(module.state_dict())
    found = {}
    for n in names:
        key = prefix + n
        if key not in weights and aliases and aliases.get(key) in weights:
            key = aliases[key]
        if key not in weights:
            raise ValueError(f"the weights hold no {prefix + n!r}")
        found[key] = n
    sd = weights.read(list(found), dtype)
    module.load_state_dict({found[k]: v.to(device) if device else v for k, v in sd.items()}, assign=True)
    return module


def stream(blocks, weights, prefix, dtype=None, device=None):
    """Each module of ``blocks`` (built on the meta device) reads its weights (``prefix``.i.*) just before
    its forward and drops them after: peak memory is one block's, at the cost of reading the file at every
    forward (for a text encoder, once per prompt batch). Every block's weights are checked to be there
    now, so a damaged file fails at load, not at the first prompt."""
    for i, block in enumerate(blocks):
        missing = [n for n in block.state_dict() if f'{prefix}.{i}.{n}' not in weights]
        if missing:
            raise ValueError(f"the weights hold no {f'{prefix}.{i}.{missing[0]}'!r}"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ''))
        def load(module, args, i=i):
            materialize(module, weights, f'{prefix}.{i}.', dtype, device)

        def drop(module, args, output):
            module.to_empty(device='meta')     # the weights' memory goes back at once
            if module is blocks[-1]:
                give_back_memory()
            return output
        block.register_forward_pre_hook(load)
        block.register_forward_hook(drop)
    return blocks


class OnDemand:
    """A model loaded when used: ``with using(model) as m:`` calls ``load()``, and releases the model after
    the block unless ``keep`` (then it is loaded once, at the first use). The keyword ``attrs`` (config,
    width, id, ...) are known without loading it; anything else is the loaded model's, inside ``using``."""

    def __init__(self, load, keep=False, **attrs):
        self.load, self.keep, self.model = load, keep, None
        self.__dict__.update(attrs)


@contextmanager
def _loaded(on_demand):
    model = on_demand.model if on_demand.model is not None else on_demand.load()
    if on_demand.keep:
        on_demand.model = model
    try:
        yield model
    finally:
        del model
        if not on_demand.keep:
            give_back_memory()


def using(model):
    """A context giving the model itself; an `OnDemand` one is loaded for the block (released after unless
    kept)."""
    return _loaded(model) if isinstance(model, OnDemand) else nullcontext(model)


def hub_folder(name, download=True):
    """The local folder of a Hugging Face model's config and weights: from the cache, else downloaded where
    the environment lets from_pretrained download. ``download=False``: never; None where it is not cached."""
    from huggingface_hub import snapshot_download
    patterns = ['*.json', '*.safetensors', '*.bin']
    if download:
        return snapshot_download(name, allow_patterns=patterns)
    try:
        return snapshot_download(name, local_files_only=True, allow_patterns=patterns)
    except Exception:  # noqa: BLE001 (not cached, an invalid name, ...: unknown)
        return None


def give_back_memory():
    """Free what released models leave: their reference cycles (transformers models hold some), and the
    C heap's free pages (glibc keeps freed blocks under 32 MB for reuse, which counts as resident)."""
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):           # not glibc: the memory is still reused, just not returned
        pass


def available_memory():
    """Bytes of RAM available to a new allocation (MemAvailable; None where /proc/meminfo is missing)."""
    try:
        for line in Path('/proc/meminfo').read_text().splitlines():
            if line.startswith('MemAvailable:'):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_is_short(models, dtype, encoders=(), share=0.8):
    """Whether everything loaded at once would take more than ``share`` of the available RAM: the weights
    files of ``models`` (float32 on disk) held at ``dtype``, and those of ``encoders`` as they are (held in
    float32 when everything is loaded)."""
    def size(files):
        return sum(Path(f).stat().st_size for f in files if Path(f).is_file())
    need = size(models) * torch.empty(0, dtype=dtype).element_size() / 4 + size(encoders)
    free = available_memory()
    return free is not None and need > share * free
