"""What every training run shares: data, output, optimisation, precision, scale, logging and saving.

Each recipe (paella.train.recipes) extends `TrainConfig` with its own fields and defaults; the command
line flags are generated from these dataclasses (paella.flags), with help from the comments below.
"""
import math
from dataclasses import dataclass, field
from typing import ClassVar


@dataclass
class TrainConfig:
    data: str = ''                  # image folder, webdataset shards (.tar, {000..099}.tar) or a
                                    # pre-encoded .safetensors file (paella preencode)
    out: str = 'runs/paella'        # checkpoints, exported model folders, metrics.jsonl
    preset: str = 'small'           # model size preset
    model: dict = field(default_factory=dict)    # model config over the preset, e.g. --model.c-cond 512
    filters: dict = field(default_factory=dict)  # shards: data.webdataset_filter options, e.g. --filters.min-size 512
    init: str = ''                  # start from these weights (a model folder) instead of random ones
    freeze: str = ''                # parameters to keep fixed: comma-separated name prefixes, e.g.
                                    # in_block,down_blocks,vquantizer trains a VQGAN's decoder alone
    image_size: int = 64            # raw images: side in pixels after the resize and crop (the generator
                                    # reads their tokens at the VQGAN's native 4 px a token)
    batch_size: int = 32            # global, over all processes and accumulation steps
    grad_accum: int = 1             # micro-batches per optimizer step
    steps: int = 1000               # optimizer steps in all (a resumed run continues to this)
    lr: float = 3e-4                # AdamW learning rate after the warm-up
    warmup: int = 100               # steps of linear learning-rate warm-up
    lr_schedule: str = 'constant'   # after the warm-up: constant (published) or cosine (to lr / 10)
    weight_decay: float = 0.01      # AdamW's decoupled weight decay
    betas: tuple = (0.9, 0.999)     # AdamW's moment decays
    grad_clip: float = 1.0          # gradient norm clipped to this
    precision: str = 'bf16'         # fp32, bf16 or fp16 (with a grad scaler)
    ema: float = 0.0                # EMA decay of the weights (0: no EMA)
    ema_start: int = 0              # copy the weights into the EMA until this step
    compile: bool = False           # torch.compile the model
    fsdp: bool = False              # shard parameters, gradients and optimizer state over processes
    seed: int = 0                   # initial weights, data order and every random draw of a step
    num_workers: int = 0            # data loader processes
    log_every: int = 10             # steps per metrics.jsonl line (means over them)
    save_every: int = 500           # steps per checkpoint (and at the end)
    keep: int = 3                   # checkpoints kept
    sample_every: int = 0           # generator: a sample grid every this many steps (0: never)
    tensorboard: bool = True        # also log to out/tensorboard
    wandb: str = ''                 # a wandb project name to log to (optional)
    samples: ClassVar[bool] = False  # whether the recipe draws sample grids (--sample-every)

    def check(self, world):
        """Errors a run would otherwise meet late, or never (a silent wrong setting): each a one-line
        ValueError naming the flag, before any work."""
        if not self.data:
            raise ValueError("--data (an image folder, shards or a pre-encoded .safetensors file) is required")
        for name, low in INT_BOUNDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        for name in ('lr', 'grad_clip'):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value!r}")
        if self.sample_every and not self.samples:
            raise ValueError("--sample-every is for the generator: this recipe draws no samples")
        if not 0 <= self.ema < 1:
            raise ValueError(f"--ema must be in [0, 1) (0: no EMA), got {self.ema!r}")
        if self.batch_size % (world * self.grad_accum):
            raise ValueError(f"batch_size {self.batch_size} must be divisible by processes x grad_accum "
                             f"= {world} x {self.grad_accum}")
        if self.precision not in ('fp32', 'bf16', 'fp16'):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.lr_schedule not in ('constant', 'cosine'):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.fsdp and world > 1 and self.ema:
            raise ValueError("--fsdp works without EMA: pass --ema 0")


# The integer settings and their least values (checked by `TrainConfig.check`).
INT_BOUNDS = dict(batch_size=1, grad_accum=1, steps=1, warmup=0, save_every=1, keep=1, log_every=1, sample_every=0,
                  num_workers=0, image_size=1, ema_start=0, seed=0)


def lr_factor(cfg, step):
    """Linear warm-up, then constant or a cosine decay to a tenth at cfg.steps."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.lr_schedule == 'cosine':
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0
