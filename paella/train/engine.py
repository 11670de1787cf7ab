"""One training loop for every recipe and every scale: 1 CPU, 1 GPU, or N GPUs on M nodes (torchrun).

Distributed training is read from the environment torchrun sets; rank 0 alone logs and saves. The
loop is the published one (sample noise, predict, weighted loss, AdamW step) plus what a long run needs:
mixed precision, gradient accumulation, resuming from the newest checkpoint, and hooks after each step
(the recipe's own work, the EMA, logging, checkpoints, sample grids) in that order.
"""
import copy
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..data import StepSampler, collate
from ..model import PaellaConfig
from ..prior import PriorConfig
from ..vq import VQConfig
from . import distributed, state
from .config import lr_factor
from .finetune import FinetuneConfig, FinetuneTask
from .log import Logger
from .recipes import GeneratorConfig, GeneratorTask, PriorTask, PriorTrainConfig, VQGANConfig, VQTask


class Recipe(NamedTuple):
    config: type        # its settings (a TrainConfig)
    task: type
    model: type         # the model config whose fields the --model.* flags set


RECIPES = {
    'generator': Recipe(GeneratorConfig, GeneratorTask, PaellaConfig),
    'vqgan': Recipe(VQGANConfig, VQTask, VQConfig),
    'prior': Recipe(PriorTrainConfig, PriorTask, PriorConfig),
    'lora': Recipe(FinetuneConfig, FinetuneTask, PaellaConfig),
}


def task_for(cfg):
    """The task class of a recipe's config."""
    for recipe in RECIPES.values():
        if type(cfg) is recipe.config:
            return recipe.task
    raise TypeError(f"{type(cfg).__name__} is not a recipe's config: use one of "
                    f"{', '.join(r.config.__name__ for r in RECIPES.values())}")


class Run:
    """Everything the loop and its hooks share; ``step`` counts the optimizer steps done."""

    def __init__(self, cfg, task, rank, world, device):
        self.cfg, self.task, self.model = cfg, task, task.model
        self.rank, self.world, self.device = rank, world, device
        self.fsdp = cfg.fsdp and world > 1
        self.out, self.step = Path(cfg.out), 0
        self.ema = self.opt = self.sched = self.scaler = None   # set by `train`
        self.wrapped = self.data = self.logger = None            # set by `loop` (the logger on rank 0 alone)
        self.skipped, self.seen, self.t0 = 0, 0, time.perf_counter()   # bad samples, samples, for samples/s
        self.data_skips = 0     # micro-batches drawn for steps whose whole global batch was bad (not steps)


def train(cfg):
    """Train the recipe of ``cfg`` (a config of paella.train.recipes) until cfg.steps, resuming from the
    newest checkpoint in cfg.out if there is one. Returns the model (unwrapped)."""
    rank, world, device = distributed.setup()
    cfg.check(world)
    state.check_out(cfg)                              # not a file, not another recipe's run folder
    if rank == 0:
        state.clean_temp(cfg.out)                     # what interrupted writes left
    resume_path, resume = state.latest(cfg.out, warn=rank == 0)
    torch.manual_seed(cfg.seed)                       # identical initial weights on every rank
    run = Run(cfg, task_for(cfg)(cfg, device), rank, world, device)
    if cfg.init:
        state.init_from(run.model, cfg.init, log=rank == 0)
    if resume is not None:
        state.load_weights(run.model, resume['model'], resume_path)
    state.freeze(run.model, cfg.freeze, type(run.model).__name__).to(device)
    run.ema = copy.deepcopy(run.model).eval().requires_grad_(False) if cfg.ema else None
    if run.fsdp:
        distributed.shard(run.model, device, world)  # before the optimizer sees the parameters
    run.opt = torch.optim.AdamW([p for p in run.model.parameters() if p.requires_grad], lr=cfg.lr,
                                betas=cfg.betas, weight_decay=cfg.weight_decay, fused=device.type == 'cuda')
    run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, lambda s: lr_factor(cfg, s))
    run.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == 'fp16')
    if resume is not None:
        load(run, resume, resume_path)
        del resume
    if run.step < cfg.steps:
        loop(run)
    if world > 1:
        dist.barrier()
    if rank == 0:
        state.finish(cfg)                             # the last `keep` checkpoints, no temporary file
    return run.model


def load(run, ck, path):
    """Continue where the checkpoint ``ck`` stopped: optimizer, schedule, scaler, task state, RNG."""
    if run.ema is not None and ck.get('ema') is not None:
        run.ema.load_state_dict(ck['ema'])
    distributed.load_optimizer(run.model, run.opt, ck['optimizer'], run.fsdp)
    run.sched.load_state_dict(ck['scheduler'])
    run.scaler.load_state_dict(ck['scaler'])
    run.task.load_state_dict(ck['task'])
    torch.set_rng_state(ck['rng']['torch'])
    run.step, run.data_skips = ck['step'], ck.get('data', {}).get('skipped_batches', 0)
    if run.rank == 0:
        print(f"resuming from {path} at step {run.step}")
        if run.step >= run.cfg.steps:                 # a kill may have come between this save and its export
            state.export_if_stale(run, ck)


def collate_rows(samples):
    """`collate`, and the places of the good samples in this rank's share of the micro-batch: their random
    draws and dropout masks are those of their global position, whichever others were bad."""
    batch, bad = collate(samples)
    return batch, bad, [i for i, s in enumerate(samples) if 'skip' not in s]


def batches(run):
    """Micro-batches of this rank: a pure function of (seed, position) for map-style data, so a resumed
    run reads exactly what an uninterrupted one would; a resampled shard stream resumes with fresh draws."""
    cfg, dataset = run.cfg, run.task.dataset
    micro_global = cfg.batch_size // cfg.grad_accum
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if hasattr(dataset, 'resume'):          # a resumed run draws a stream of its own, seeded by its step
            dataset.resume(run.step)
        loader = torch.utils.data.DataLoader(dataset, batch_size=micro_global // run.world, collate_fn=collate_rows,
                                             num_workers=cfg.num_workers)
    else:
        sampler = StepSampler(len(dataset), micro_global, run.rank, run.world, cfg.seed,
                              run.step * cfg.grad_accum + run.data_skips)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_rows,
                                             num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    return iter(loader)


# Global batches in a row with no good sample before the run stops: data that yields nothing at all.
MAX_BAD_BATCHES = 50


def loop(run):
    from tqdm import tqdm
    cfg, rank = run.cfg, run.rank
    run.wrapped = distributed.wrap(run.model, run.device, run.world, run.fsdp, cfg.compile)
    run.data = batches(run)
    if rank == 0:
        state.write_config(cfg)
        run.logger = Logger(cfg, run.out, run.step)
    run.t0, bad_in_a_row = time.perf_counter(), 0
    bar = tqdm(total=cfg.steps, initial=run.step, disable=rank != 0, dynamic_ncols=True, mininterval=1.0)
    while run.step < cfg.steps:
        metrics = one_step(run)
        if metrics is None:       # no good sample in the whole global batch: nothing learnt, not a step
            run.data_skips += cfg.grad_accum
            bad_in_a_row += 1
            if bad_in_a_row >= MAX_BAD_BATCHES:
                raise ValueError(f"{cfg.data}: no good sample in {bad_in_a_row} batches in a row "
                                 f"({run.skipped} bad samples; see {run.out / 'skipped.log'})")
            continue
        run.step, bad_in_a_row = run.step + 1, 0
        bar.update(1)
        run.task.after_step(run.step - 1, run.model)
        for hook in (update_ema, log, save, samples):
            hook(run, metrics, bar)
    bar.close()
    if rank == 0:
        run.logger.close()
        if run.skipped:
            print(f"skipped {run.skipped} bad samples; see {run.out / 'skipped.log'}")


def one_step(run):
    """One optimizer step over cfg.grad_accum micro-batches. Returns its metrics, means over the good
    samples of the global batch (every process's), or None where there was none (then nothing changes).

    Every process runs every micro-batch that has a good sample on any process, so that all of them meet in
    each collective (the batch norm's, DDP's or FSDP's gradient reduction) in the same order: one with none
    of its own runs a placeholder (`distributed.borrow`) whose loss is weighted 0. The loss is the mean over
    the step's good samples, wherever they are: N processes compute what one does."""
    cfg, model, rank, world = run.cfg, run.model, run.rank, run.world
    step, micro_global = run.step, cfg.batch_size // cfg.grad_accum
    torch.manual_seed(distributed.seed_of(cfg.seed, step, rank, 1))   # the model's draws come from below
    autocast = (torch.autocast(run.device.type, dtype=torch.bfloat16 if cfg.precision == 'bf16' else torch.float16)
                if cfg.precision != 'fp32' else nullcontext())
    micros = [next(run.data) for _ in range(cfg.grad_accum)]          # (batch, bad, good rows) of each
    # every process's (good-sample count, bad samples) of each micro-batch: one collective a step
    shared = distributed.gather_objects([(len(rows), bad) for _, bad, rows in micros])    # [rank][micro]
    note_skipped(run, step, [b for m in range(cfg.grad_accum) for part in shared for b in part[m][1]])
    counts = [[part[m][0] for part in shared] for m in range(cfg.grad_accum)]          # [micro][rank]
    total = sum(map(sum, counts))                                    # good samples of the global batch
    live = [m for m, c in enumerate(counts) if sum(c)]               # micro-batches with one somewhere
    run.seen += total
    if not total:             # no good sample anywhere: nothing learnt (every process agrees)
        return None
    sums, lo = {}, rank * (micro_global // world)                    # lo: this rank's first global position
    for m in live:
        (batch, _, rows), n, last = micros[m], len(micros[m][2]), m == live[-1]
        gen = torch.Generator().manual_seed(distributed.seed_of(cfg.seed, step, m))
        s = distributed.Slice([lo + i for i in rows] or [lo], micro_global, gen, real=n > 0)
        if 0 in counts[m]:    # some process has no good sample here: it runs a placeholder
            batch = distributed.borrow(batch, counts[m])
        if run.fsdp:
            model.set_requires_gradient_sync(last)
        # gradients are all-reduced once per step, on the last micro-batch that runs
        with nullcontext() if world == 1 or run.fsdp or last else run.wrapped.no_sync():
            with autocast, distributed.micro_batch(distributed.seed_of(cfg.seed, step, m, 2), s, run.device):
                loss, metrics = run.task.loss(run.wrapped, batch, s)
            # loss: the mean over this rank's n samples; scaled to its share of the mean over the step's
            # total (the gradient reduction averages the world's processes); a placeholder's: exactly 0
            run.scaler.scale(loss / (total / (n * world)) if n else loss * 0.0).backward()
        for k, v in ({'loss': loss.item(), **metrics}.items() if n else ()):
            sums[k] = sums.get(k, 0.0) + v * n
    sums = distributed.gather_sums(sums)                             # the logged loss is the global batch's
    run.scaler.unscale_(run.opt)                  # clip the true gradients, not the fp16-scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, 'full_tensor') else grad_norm
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    return {**{k: v / total for k, v in sums.items()}, 'grad_norm': float(grad_norm)}


def note_skipped(run, step, bad):
    """Bad samples never stop a run: rank 0 lists every process's (``bad``, gathered) in skipped.log;
    unreadable captions are kept."""
    if bad and run.rank == 0:
        with open(run.out / 'skipped.log', 'a') as f:
            f.writelines(f'step {step}: {name}: {why}\n' for name, why in bad)
    run.skipped += sum(1 for _, why in bad if not why.startswith('caption'))


def due(run, every):
    return run.step % every == 0 or run.step == run.cfg.steps


@torch.no_grad()
def update_ema(run, metrics, bar):
    if run.ema is not None:
        decay = 0.0 if run.step - 1 < run.cfg.ema_start else run.cfg.ema
        for pe, pm in zip(run.ema.parameters(), run.model.parameters()):
            if pm.requires_grad:              # frozen weights (a LoRA run's base) are equal already
                pe.lerp_(pm.detach(), 1 - decay)


def log(run, metrics, bar):
    if run.rank != 0:
        return
    run.logger.add(metrics)
    if due(run, run.cfg.log_every):
        line = run.logger.flush(run.step, lr=run.sched.get_last_lr()[0],
                                samples_per_s=run.seen / (time.perf_counter() - run.t0), skipped=run.skipped)
        bar.set_postfix({k: f'{v:.4g}' if isinstance(v, float) else v for k, v in line.items()}, refresh=False)


def save(run, metrics, bar):
    if due(run, run.cfg.save_every):
        states = distributed.full_states(run.model, run.opt, run.fsdp)   # under FSDP every rank takes part
        task_state = run.task.state_dict()                               # every rank: it may gather
        if run.rank == 0:
            state.save(run, *states, task_state)


def samples(run, metrics, bar):
    if run.rank == 0 and run.cfg.sample_every and due(run, run.cfg.sample_every) and hasattr(run.task, 'samples'):
        run.task.samples((run.ema if run.ema is not None else run.model).eval(), run.step, run.out)
        state.train_mode(run.model, run.cfg.freeze)
