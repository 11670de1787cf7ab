"""What a run keeps: checkpoints (atomic, the last ``keep``), exported model folders, resuming from the
newest checkpoint, starting from other weights (``init``) and keeping parameters fixed (``freeze``)."""
import json
import pickle
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoint import atomic_write, pickled_objects

# What a training checkpoint holds (`save`); a file without them is someone else's (a published .pt).
KEYS = ('step', 'model', 'optimizer', 'scheduler', 'scaler', 'task', 'rng')
EXPORTS = ('model', 'ema')          # the model folders written beside the checkpoints


def checkpoints(out):
    return sorted((Path(out) / 'checkpoints').glob('step_*.pt'))


def read_checkpoint(path):
    """A checkpoint's state on the CPU; None where the file is damaged (cut off, not a zip archive); a
    ValueError where it is a readable file but not a training checkpoint of this trainer."""
    try:
        ck = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:      # objects the weights-only loader refuses: never run them
        raise ValueError(f"{path} is not a paella training checkpoint (it holds {pickled_objects(e)}, which "
                         f"are never unpickled); move it out of {path.parent}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile):
        return None
    missing = [k for k in KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ValueError(f"{path} is not a paella training checkpoint (no {', '.join(missing)}); "
                         f"move it out of {path.parent}")
    return ck


def latest(out, warn=True):
    """(path, state on the CPU) of the newest readable checkpoint of a run folder, or (None, None). A
    damaged one (a copy cut off, a full disk) is set aside as ``.damaged`` with a warning, and the one
    before it is used."""
    for path in reversed(checkpoints(out)):
        ck = read_checkpoint(path)
        if ck is not None:
            return path, ck
        if warn:
            print(f"warning: {path} is damaged (cut off?): set aside as {path.name}.damaged; "
                  f"resuming from the checkpoint before it", file=sys.stderr)
            path.rename(path.with_name(path.name + '.damaged'))
    return None, None


def load_weights(model, state, path):
    """The checkpoint's weights into ``model``; one built from other settings is a one-line error."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = ' '.join(str(e).split())[:300]
        raise ValueError(f"{path} holds a model of another shape than --preset / --model.* make here (finetune: "
                         f"--base / --rank / --targets; rerun with that run's settings, or choose another --out): "
                         f"{detail}") from None


def check_out(cfg):
    """The run folder is a folder, and not one of another recipe's runs (its config.json says which)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: name a folder for the checkpoints and models")
    try:
        theirs = json.loads((out / 'config.json').read_text()).get('recipe')
    except (OSError, ValueError, AttributeError):
        return
    mine = getattr(cfg, 'recipe', None)
    if theirs and mine and theirs != mine:
        raise ValueError(f"--out {out} holds a {theirs} run; this is a {mine} run: choose another --out")


def temp_files(out):
    """Temporary files of writes that were interrupted (`atomic_write` names them .NAME.XXXX.tmp)."""
    out = Path(out)
    return [p for d in (out, out / 'checkpoints', *(out / e for e in EXPORTS)) for p in d.glob('.*.tmp')]


def clean_temp(out):
    for p in temp_files(out):
        p.unlink(missing_ok=True)


def finish(cfg):
    """At the end of a run: the last ``keep`` checkpoints (a kill may have come before the pruning) and no
    temporary file."""
    for old in checkpoints(cfg.out)[:-cfg.keep]:
        old.unlink()
    clean_temp(cfg.out)


def export(run, model_state, ema_state):
    run.task.export(run.model, Path(run.cfg.out) / 'model', model_state)
    if run.ema is not None:
        run.task.export(run.ema, Path(run.cfg.out) / 'ema', ema_state)


def export_if_stale(run, ck):
    """Write the model folders again where they do not hold the checkpoint ``ck``'s weights."""
    out = Path(run.cfg.out)
    stale = [name for name in EXPORTS[:2 if run.ema is not None and ck.get('ema') is not None else 1]
             if not run.task.exported(out / name, ck[name])]
    if stale:
        print(f"{', '.join(f'{out / n}/' for n in stale)} did not hold step {ck['step']}'s weights: written again")
        export(run, ck['model'], ck.get('ema'))


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
    for n, p in model.named_parameters():       # what a task froze itself (a LoRA run's base) stays frozen
        p.requires_grad_(p.requires_grad and not frozen(n, prefixes))
    return train_mode(model, prefixes)


def train_mode(model, freeze=''):
    """model.train(), except frozen modules stay in eval mode: their batch-norm statistics stay fixed too."""
    model.train()
    for name, module in model.named_modules():
        if name and frozen(name, freeze):
            module.eval()
    return model


def save(run, model_state, opt_state, task_state):
    """Full training state (atomically), the last ``keep`` of them, plus the exported model folders."""
    cfg, step = run.cfg, run.step
    state = {'step': step, 'model': model_state, 'ema': run.ema.state_dict() if run.ema is not None else None,
             'optimizer': opt_state, 'scheduler': run.sched.state_dict(), 'scaler': run.scaler.state_dict(),
             'task': task_state, 'config': config_dict(cfg), 'model_config': asdict(run.model.config),
             'rng': {'torch': torch.get_rng_state()}, 'data': {'skipped_batches': run.data_skips}}
    out = Path(cfg.out)
    # The exports first: a kill before the checkpoint's rename redoes these steps and exports again; once
    # the checkpoint is there, its exports are too (a rerun also checks: `export_if_stale`).
    export(run, model_state, state['ema'])
    atomic_write(out / 'checkpoints' / f'step_{step:07d}.pt', lambda p: torch.save(state, p))
    for old in checkpoints(out)[:-cfg.keep]:
        old.unlink()


def config_dict(cfg):
    return {'recipe': getattr(cfg, 'recipe', None), **asdict(cfg)}


def write_config(cfg):
    out = Path(cfg.out)
    (out / 'checkpoints').mkdir(parents=True, exist_ok=True)
    atomic_write(out / 'config.json', lambda p: Path(p).write_text(json.dumps(config_dict(cfg), indent=2)))
