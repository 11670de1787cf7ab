"""What a run keeps: checkpoints (atomic, the last ``keep``), exported model folders, resuming from the
newest checkpoint, starting from other weights (``init``) and keeping parameters fixed (``freeze``)."""
import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoint import atomic_write


def checkpoints(out):
    return sorted((Path(out) / 'checkpoints').glob('step_*.pt'))


def latest(out):
    """(path, state on the CPU) of the newest checkpoint of a run folder, or (None, None)."""
    found = checkpoints(out)
    return (found[-1], torch.load(found[-1], map_location='cpu', weights_only=True)) if found else (None, None)


def init_from(model, folder, log=True):
    """Load a model folder's weights into ``model``, which may have more modules than the folder: those
    start as built (a grown VQGAN decoder's new blocks have zero gammas, so it first computes the old
    function). A tensor of another shape, or one the model lacks, is an error."""
    state = type(model).from_pretrained(folder).state_dict()
    mine = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(mine[k].shape)}" for k, v in state.items()
             if k in mine and v.shape != mine[k].shape]
    unknown = sorted(set(state) - set(mine))
    if wrong or unknown:
        raise ValueError(f"--init {folder} does not fit this model: " +
                         '; '.join((wrong + [f"{k} not in the model" for k in unknown])[:10]))
    new = sorted(set(mine) - set(state))
    model.load_state_dict(state, strict=False)
    if new and log:
        print(f"init: {len(state)} tensors from {folder}; {len(new)} new ones start as built "
              f"({', '.join(new[:4])}{', ...' if len(new) > 4 else ''})")


def frozen(name, freeze):
    """Whether a parameter or module name falls under one of the comma-separated prefixes of ``freeze``."""
    return any(name == f or name.startswith(f + '.') for f in freeze.split(',') if f)


def freeze(model, prefixes, what):
    """requires_grad off for the parameters under ``prefixes`` (an error if they name none)."""
    if prefixes and not any(frozen(n, prefixes) for n, _ in model.named_parameters()):
        raise ValueError(f"freeze={prefixes!r} matches no parameter of the {what}")
    for n, p in model.named_parameters():
        p.requires_grad_(not frozen(n, prefixes))
    return train_mode(model, prefixes)


def train_mode(model, freeze=''):
    """model.train(), except frozen modules stay in eval mode: their batch-norm statistics stay fixed too."""
    model.train()
    for name, module in model.named_modules():
        if name and frozen(name, freeze):
            module.eval()
    return model


def save(run, model_state, opt_state):
    """Full training state (atomically), the last ``keep`` of them, plus the exported model folders."""
    cfg, step = run.cfg, run.step
    state = {'step': step, 'model': model_state, 'ema': run.ema.state_dict() if run.ema is not None else None,
             'optimizer': opt_state, 'scheduler': run.sched.state_dict(), 'scaler': run.scaler.state_dict(),
             'task': run.task.state_dict(), 'config': config_dict(cfg), 'model_config': asdict(run.model.config),
             'rng': {'torch': torch.get_rng_state()}}
    out = Path(cfg.out)
    atomic_write(out / 'checkpoints' / f'step_{step:07d}.pt', lambda p: torch.save(state, p))
    for old in checkpoints(out)[:-cfg.keep]:
        old.unlink()
    run.model.save_pretrained(out / 'model', state_dict=model_state)
    if run.ema is not None:
        run.ema.save_pretrained(out / 'ema')


def config_dict(cfg):
    return {'recipe': getattr(cfg, 'recipe', None), **asdict(cfg)}


def write_config(cfg):
    out = Path(cfg.out)
    (out / 'checkpoints').mkdir(parents=True, exist_ok=True)
    atomic_write(out / 'config.json', lambda p: Path(p).write_text(json.dumps(config_dict(cfg), indent=2)))
