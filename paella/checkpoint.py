"""Checkpoint I/O shared by every model: official ``.pt`` files, ``.safetensors`` files, and model folders.

A model folder holds ``model.safetensors`` and ``config.json`` (the model's dataclass config), so loading
needs nothing else. Official files (``paella_v3.pt``, ``vqgan_f4.pt``, ``prior_v1.pt``) are bare state
dicts, or dicts with the weights under ``state_dict``; they are read with ``torch.load(weights_only=True)``,
which never unpickles arbitrary objects.
"""
import hashlib
import json
import os
import re
import tempfile
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'


class CheckpointError(ValueError):
    """A file that is not a checkpoint, or whose weights do not fit the model."""


def read_state_dict(path, dtype=None):
    """Return (state_dict, config_or_None) from a .safetensors file or a torch checkpoint file.

    The config comes from the safetensors metadata key ``config`` when present. ``dtype``: floating tensors
    are converted as they are read, a few hundred MB at a time (`offload.Weights`), so reading a 4 GB
    float32 file into bfloat16 peaks near 2 GB, not 6.
    """
    from .offload import Weights
    names, config = checked_names(path)
    try:
        return Weights([Path(path)]).read(names, dtype), config
    except Exception as e:  # safetensors raises its own error types for damaged data
        raise CheckpointError(f"{path} could not be read: {e}") from None


def checked_names(path):
    """(tensor names, config_or_None) of a checkpoint file, checked without reading its tensors: a
    CheckpointError says what the path is instead (a folder, a pickle of other objects, ...)."""
    path = Path(path)
    if (path / 'pipeline.json').is_file():
        raise CheckpointError(f"{path} is a pipeline folder: name one of its models, e.g. {path / 'generator'}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder without a model ({CONFIG_NAME} + {WEIGHTS_NAME})")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, 'rb') as f:
        head = f.read(8)
    if path.suffix == '.safetensors':
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework='pt') as f:
                meta, names = f.metadata() or {}, list(f.keys())
        except Exception as e:  # safetensors raises its own error types for malformed headers
            raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None
        return names, json.loads(meta['config']) if 'config' in meta else None
    if not (head.startswith(b'PK') or head[:1] == b'\x80'):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (a zip or pickle file) nor a .safetensors file")
    try:
        # mmap: only the names are read here (zip format; an old-style pickle loads whole).
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')     # "Detected pickle protocol 4": the refusal below says enough
            obj = torch.load(path, map_location='cpu', weights_only=True, mmap=head.startswith(b'PK'))
    except Exception as e:
        raise CheckpointError(refusal(path, e)) from None
    if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
        obj = obj['state_dict']
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path} holds no state dict (expected a dict of tensors, "
                              f"or one under the key 'state_dict'), got {type(obj).__name__}")
    return list(obj), None


def pickled_objects(error):
    """What torch.load(weights_only=True) refused, named from its error ('Python objects (io.open)'),
    without PyTorch's advice to retry unsafely."""
    found = re.search(r'Unsupported global: GLOBAL ([\w.]+)', str(error))
    return f"Python objects ({found.group(1)})" if found else "Python objects"


def refusal(path, error):
    """Why torch.load(weights_only=True) refused a file, and what to do instead."""
    return (f"{path} holds {pickled_objects(error)} besides tensors: it is a pickle, and paella reads weights "
            f"only (a pickle can run any code). Save the model's state_dict() from the code that made it, or use "
            f"safetensors")


def digest(path):
    """sha256 of a weights file, read in 16 MB blocks (4 GB of v3 weights: ~3 s)."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(16 * 2 ** 20):
            h.update(block)
    return h.hexdigest()


def check_state_dict(module, sd):
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys; silent when sd fits."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        def show(title, items):
            more = f" ... and {len(items) - 8} more" if len(items) > 8 else ''
            return f"\n  {title} ({len(items)}): " + ', '.join(items[:8]) + more if items else ''
        raise CheckpointError(f"checkpoint does not fit {type(module).__name__}"
                              + show('missing keys', missing) + show('unexpected keys', unexpected)
                              + show('shape mismatches', shapes)
                              + "\n  (pass the model's config or preset if it is not the default size)")


def atomic_write(path, write):
    """Write through a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)       # mkstemp's 0600 would keep a shared model folder from others
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Pretrained:
    """Mixin for nn.Modules with a dataclass config: save_pretrained / from_pretrained.

    Subclasses name their ``config_class``, ``presets`` (name -> kwargs), ``default_preset`` and
    ``model_type`` in the class statement, and build from ``self.configure(config, kwargs)``.
    """
    config_class = None
    presets = {}
    default_preset = None
    model_type = None

    def __init_subclass__(cls, config_class=None, presets=None, default_preset=None, model_type=None, **kwargs):
        super().__init_subclass__(**kwargs)
        # Only what is named: a subclass made on the fly (FSDP2 swaps in one) keeps its parent's.
        given = dict(config_class=config_class, presets=presets, default_preset=default_preset, model_type=model_type)
        for name, value in given.items():
            if value is not None:
                setattr(cls, name, value)

    def configure(self, config, overrides):
        """``config`` (the published defaults when None) with keyword ``overrides``, kept as ``self.config``."""
        self.config = replace(config or self.config_class(), **overrides)
        return self.config

    @classmethod
    def make_config(cls, preset=None, **overrides):
        """Config from a preset name (or the default preset) with keyword overrides."""
        name = preset or cls.default_preset
        if name is not None and name not in cls.presets:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; choose from {sorted(cls.presets)}")
        kwargs = dict(cls.presets.get(name, {}), **overrides)
        return cls.config_class(**kwargs)

    @classmethod
    def config_from_dict(cls, d):
        known = {f.name for f in fields(cls.config_class)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"config has keys {unknown} that {cls.__name__} does not take")
        return cls.config_class(**d)

    def save_pretrained(self, folder, state_dict=None):
        """Write ``model.safetensors`` + ``config.json`` into folder (created if needed); ``state_dict``
        replaces the module's own (e.g. one gathered from FSDP shards)."""
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in (state_dict or self.state_dict()).items()}
        meta = {'model_type': self.model_type, 'config': json.dumps(asdict(self.config))}
        atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(sd, p, metadata=meta))
        # The digest lets loading tell damaged weights from a model that merely draws badly.
        text = json.dumps({'model_type': self.model_type, 'config': asdict(self.config),
                           'sha256': digest(folder / WEIGHTS_NAME)}, indent=2)
        atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(text + '\n'))
        return folder

    @classmethod
    def from_pretrained(cls, path, preset=None, config=None, device=None, dtype=None, **overrides):
        """Load a model folder, a .safetensors file or an official .pt file.

        The config comes from, in order: ``config`` (a config object), ``preset`` / ``overrides``, the
        folder's config.json or the safetensors metadata, the class's default preset (``v3`` for
        Paella, the published f4 VQGAN for VQModel).
        """
        path = Path(path)
        stored = None
        if path.is_dir():
            if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
                raise CheckpointError(f"{path} is not a model folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
            try:
                meta = json.loads((path / CONFIG_NAME).read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path / CONFIG_NAME} is not valid JSON: {e}") from None
            if meta.get('model_type') not in (None, cls.model_type):
                raise CheckpointError(f"{path} holds a {meta.get('model_type')!r} model, not {cls.model_type!r}")
            stored = meta.get('config', meta)
            if 'sha256' in meta and digest(path / WEIGHTS_NAME) != meta['sha256']:
                raise CheckpointError(f"{path / WEIGHTS_NAME} does not match the sha256 in its {CONFIG_NAME}: "
                                      f"the file was damaged or changed after it was saved")
            sd, _ = read_state_dict(path / WEIGHTS_NAME, dtype)
        else:
            sd, stored = read_state_dict(path, dtype)
        if config is None:
            if preset is not None or overrides or stored is None:
                config = cls.make_config(preset, **overrides)
            else:
                config = cls.config_from_dict(stored)
        with torch.device('meta'):
            model = cls(config)          # no time spent initialising weights that are overwritten
        check_state_dict(model, sd)
        model.load_state_dict(sd, strict=True, assign=True)
        model.eval()
        model.source = str(path.resolve())      # where the weights came from (recorded by preencode)
        return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())


def detect_model_type(state_dict):
    """'paella', 'vqgan' or 'prior', from the keys a state dict holds."""
    if 'vquantizer.codebook.weight' in state_dict:
        return 'vqgan'
    if 'byt5_mapper.weight' in state_dict:
        return 'paella'
    if 'blocks.0.weight' in state_dict and all(k.startswith('blocks.') for k in state_dict):
        return 'prior'                  # the published prior is one list of blocks (prior_v1.pt)
    raise ValueError("cannot tell which model these weights are for (no 'byt5_mapper.weight', "
                     "'vquantizer.codebook.weight' nor a prior's 'blocks.*'); pass --model")


def model_type_of(path):
    """'paella', 'vqgan' or 'prior' for a model folder (its config), a .safetensors file or an official
    .pt file (from the keys its weights hold)."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return json.loads((path / CONFIG_NAME).read_text()).get('model_type')
    return detect_model_type(dict.fromkeys(checked_names(path)[0]))
