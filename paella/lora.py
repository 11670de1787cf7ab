"""LoRA adapters for the generator, through `peft` (the field's library), in peft's own folder format.

A LoRA adapter adds to a frozen layer W a low-rank update: W x + (alpha / rank) * B A x, A (rank, in) and
B (out, rank), B starting at zero so that training starts from the base model's function. Only A and B
train: a rank-8 adapter of the emoji generator is ~390 thousand numbers (1.6 MB) beside its 13 million.

The U-Net's attention projects queries, keys and values with one raw parameter (`blocks.Attention`, the
published layout), which peft cannot wrap; the default targets are the layers around it that it can: the
text mapper, each attention block's key/value mapper and output projection, and every channel MLP.

An adapter folder holds ``adapter_config.json`` (peft's `LoraConfig`) and ``adapter_model.safetensors``
(peft's tensor names, e.g. ``down_blocks.1.3.out_proj.lora_A.weight``). The config's
``base_model_name_or_path`` names the base: ``sha256:<digest of the generator's weights file>``; loading an
adapter onto another generator is an error (its update was learnt against those weights).
"""
import hashlib
import json
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import checks
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, atomic_write, digest

# the layers a LoRA adapter wraps by default (peft matches a module name or its dotted suffix)
DEFAULT_TARGETS = ('byt5_mapper', 'kv_mapper.1', 'out_proj', 'channelwise.0', 'channelwise.4')
ADAPTER_CONFIG, ADAPTER_WEIGHTS = 'adapter_config.json', 'adapter_model.safetensors'


def config(rank=8, alpha=None, targets=DEFAULT_TARGETS, dropout=0.0, base=''):
    """peft's LoraConfig: ``alpha`` None = rank (scale 1); ``targets`` layer names or a comma-separated
    string of them; ``base`` the base generator's `base_digest`."""
    from peft import LoraConfig
    if isinstance(targets, str):
        targets = [t for t in targets.split(',') if t]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=list(targets),
                      lora_dropout=dropout, base_model_name_or_path=base)


def base_digest(model):
    """'sha256:<hex>' of the generator's weights: its model folder's recorded digest, or its file's, or
    (a model built or changed in memory) of its tensors, each in name order with its dtype and shape."""
    source = Path(getattr(model, 'source', None) or '')
    if source.is_dir() and (source / CONFIG_NAME).is_file():
        recorded = json.loads((source / CONFIG_NAME).read_text()).get('sha256')
        return f"sha256:{recorded or digest(source / WEIGHTS_NAME)}"
    if source.is_file():
        return f"sha256:{digest(source)}"
    h = hashlib.sha256()
    for name, t in sorted(base_state(model).items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return f"sha256:{h.hexdigest()}"


def base_state(model):
    """The model's own tensors, under their plain names, without any adapter's."""
    return {k.replace('.base_layer.', '.'): v for k, v in model.state_dict().items() if '.lora_' not in k}


def attach(model, cfg, name='default'):
    """Wrap ``model``'s target layers with a new adapter ``name`` (A random, B zero: the model's function
    is unchanged); every other parameter is frozen. An error when the targets name no layer."""
    from peft import inject_adapter_in_model
    try:
        with warnings.catch_warnings():          # peft's note that a second adapter makes several: we mean it
            warnings.filterwarnings('ignore', 'Already found a `peft_config`')
            inject_adapter_in_model(cfg, model, adapter_name=name)
    except ValueError as e:       # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"LoRA targets {','.join(sorted(cfg.target_modules))} do not fit this generator: {e}") \
            from None
    for n, p in model.named_parameters():
        p.requires_grad_(f'.lora_A.{name}.' in n or f'.lora_B.{name}.' in n)
    return model


def layers(model):
    from peft.tuners.lora import LoraLayer
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def adapter_state(state_dict, name='default'):
    """An adapter's tensors under peft's saved names, from a model's state dict (``...lora_A.<name>.weight``
    -> ``...lora_A.weight``)."""
    return {k.replace(f'.{name}.', '.'): v for k, v in state_dict.items()
            if f'.lora_A.{name}.' in k or f'.lora_B.{name}.' in k}


def save(folder, cfg, state_dict, name='default'):
    """Write an adapter folder from a model state dict holding adapter ``name``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in adapter_state(state_dict, name).items()}
    atomic_write(folder / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata={'format': 'pt'}))
    text = json.dumps(cfg.to_dict(), indent=2, default=list) + '\n'
    atomic_write(folder / ADAPTER_CONFIG, lambda p: Path(p).write_text(text))
    return folder


def check_folder(folder):
    """CheckpointError unless ``folder`` has an adapter's two files (their contents: `read`)."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{folder} is not a LoRA adapter folder: it needs {ADAPTER_CONFIG} and "
                              f"{ADAPTER_WEIGHTS} (paella finetune writes them)")
    return folder


def read(folder):
    """(LoraConfig, tensors) of an adapter folder; CheckpointError naming what is missing or wrong."""
    from peft import LoraConfig
    folder = check_folder(folder)
    try:
        cfg = LoraConfig.from_pretrained(str(folder))
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as e:        # a damaged or foreign file: one line, never a traceback
        raise CheckpointError(f"{folder} holds an unreadable adapter: {' '.join(str(e).split())[:200]}") from None
    if cfg.peft_type != 'LORA':
        raise CheckpointError(f"{folder} holds a {cfg.peft_type} adapter; paella loads LoRA adapters")
    return cfg, tensors


def load(model, folder, name, scale=1.0):
    """Add the adapter of ``folder`` to ``model`` as ``name`` at ``scale``; the model's active adapters
    become its adapters so far plus this one. ValueError where it was trained on another base."""
    from peft import set_peft_model_state_dict
    cfg, tensors = read(folder)
    mine, theirs = base_digest(model), cfg.base_model_name_or_path
    if theirs and theirs != mine:
        raise ValueError(f"the LoRA adapter {folder} was trained on another generator ({theirs[:19]}...; this "
                         f"one is {mine[:19]}...): load it onto the model it was trained on")
    attach(model, cfg, name)
    result = set_peft_model_state_dict(model, tensors, adapter_name=name)
    missing = [k for k in result.missing_keys if f'.{name}.' in k]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{folder} does not fit its own targets: missing {missing[:3]}, unexpected "
                              f"{list(result.unexpected_keys)[:3]}")
    for layer in layers(model):
        if name in layer.lora_A:
            layer.set_scale(name, scale)
    activate(model)
    return model


def activate(model):
    """Every adapter a layer holds is active (peft sums their updates, each at its own scale)."""
    for layer in layers(model):
        layer.set_adapter(sorted(layer.lora_A.keys()))
        layer.requires_grad_(False)


def remove(model, merge=False):
    """Put back each wrapped layer's base layer, with the active adapters' updates added to its weights
    when ``merge`` (then the model's weights are new: its digest is computed from them from now on)."""
    wrapped = set(layers(model))
    for path, module in list(model.named_modules()):
        if module in wrapped:
            if merge:
                module.merge(adapter_names=list(module.active_adapters))
            parent, _, child = path.rpartition('.')
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    if merge:
        model.source = None
    model.__dict__.pop('peft_config', None)         # peft's record of the adapters it added
    return model


class Adapters:
    """`paella.pipeline.Pipeline`'s LoRA methods: adapters on its generator, taken off, or fused into it. They
    use the pipeline's ``generator``, ``runner`` (what the sampler calls), ``loras`` ({name: (folder, scale)}),
    ``captions`` and ``settings``."""

    def load_lora(self, path, scale=1.0):
        """Add a LoRA adapter folder (`paella.lora`, written by `paella finetune`) to the generator at
        ``scale`` (0: no effect; 1: as trained); several add up, each at its own scale. Returns its name.
        ValueError where it was trained on another generator. A compiled pipeline runs uncompiled after."""
        name = f'lora{len(self.loras)}'
        load(self.generator, path, name, checks.number(scale, 'LoRA scale', -100, 100))
        self.loras[name], self.runner = (str(path), scale), self.generator
        return name

    def unload_lora(self):
        """Take every LoRA adapter off: the generator computes exactly what it did before them."""
        remove(self.generator)
        self.loras, self.runner = {}, self.generator

    def fuse_lora(self):
        """Add the adapters' updates to the generator's weights (faster sampling; `save_pretrained` then
        writes a pipeline with them built in, without the retrieval prior); they can no longer be taken off."""
        remove(self.generator, merge=True)
        self.loras, self.runner = {}, self.generator
        # the fused generator may know captions the retrieval prior does not: no prior from now on
        self.captions, self.settings = None, replace(self.settings, caption_temperature=None)
