"""Rank 0's record of a run: metrics.jsonl always, TensorBoard and wandb when available and asked for."""
import json
from dataclasses import asdict
from pathlib import Path

from ..checkpoint import atomic_write


class Logger:
    """Means of each metric over the steps since the last line; ``log_every`` steps a line."""

    def __init__(self, cfg, out, resume_step):
        keep_until(out / 'metrics.jsonl', resume_step)
        self.file = open(out / 'metrics.jsonl', 'a')
        self.window, self.tb, self.wandb = {}, None, None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(out / 'tensorboard', purge_step=resume_step)
            except ImportError:
                pass
        if cfg.wandb:
            import wandb
            self.wandb = wandb.init(project=cfg.wandb, config=asdict(cfg), dir=str(out), resume='allow',
                                    id=(out / 'wandb-id').read_text() if (out / 'wandb-id').exists() else None)
            (out / 'wandb-id').write_text(self.wandb.id)

    def add(self, metrics):
        for k, v in metrics.items():
            self.window.setdefault(k, []).append(v)

    def flush(self, step, **extra):
        """Write the window's means (and ``extra``) for ``step``; returns what was written."""
        metrics = {k: sum(v) / len(v) for k, v in self.window.items()}
        metrics.update(extra)
        self.window = {}
        self.file.write(json.dumps({'step': step, **metrics}) + '\n')
        self.file.flush()
        for k, v in metrics.items():
            if self.tb is not None and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        return metrics

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def keep_until(path, step):
    """Drop the lines of a metrics file after ``step``: a resumed run logs those steps again (a kill after
    a line was written but before the next checkpoint), and each step appears once. A cut-off last line
    goes too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)['step'] <= step:
                kept.append(line + '\n')
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write(path, lambda p: Path(p).write_text(''.join(kept)))
