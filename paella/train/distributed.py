"""One process, or many under torchrun: the rank and device, the step's random draws, FSDP2 sharding.

Every random draw of a step comes from a generator seeded by (seed, step, micro-batch), drawn for the
whole global batch and sliced per rank; the model's dropout masks are hashed from (seed, step,
micro-batch, the sample's global position); batch-norm statistics are taken over the global batch. So a
run resumed from a checkpoint, or split over more processes, computes the same updates as one
uninterrupted process, to float rounding: in fp32 within 1e-5 after a few steps (tested: the generator
with dropout 0.1, DDP and FSDP; the VQGAN with dead-code restarts, but for the few values whose gradient
is 0 in exact arithmetic, which Adam moves on rounding noise in any run). Not in bf16: each process's
half-batch matmuls and the gradient all-reduce round differently, and Adam carries that on (measured on
the CPU, tiny generator, 6 steps at lr 1e-3, 2 processes vs 1: max weight difference 6.2e-3, median
5e-5, 26% of the values beyond 1e-4; tiny VQGAN, 4 steps: weights up to 5e-3 apart, and 56 of 64 codebook
rows, because bf16 flips some nearest-code choices, so other codes are dead at the restart).

Bad samples change none of this: a good sample keeps its global position's draws, the loss is the mean
over the good samples of every process, and a process whose share of a micro-batch is all bad runs a
placeholder weighted 0 (`borrow`), so that every process meets every collective, in the same order
(tested: 2 processes vs 1 with micro-batches good on one process and bad on the other).
"""
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .. import blocks


def setup():
    """(rank, world size, device) from torchrun's environment; one process on the best device otherwise."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (('WORLD_SIZE', 1), ('RANK', 0), ('LOCAL_RANK', 0)))
    if torch.cuda.is_available():
        device = torch.device('cuda', local)
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world, device


def seed_of(*parts):
    """A 63-bit seed from integers (FNV-1a style), stable across processes, runs and Python versions."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class Slice:
    """This rank's rows of the global micro-batch of size total: its good samples, at global positions
    ``rows`` (so a sample's draws do not depend on which others were bad). ``real`` is False for a
    placeholder (`borrow`): a sample run only to take part in the collectives, weighted 0."""

    def __init__(self, rows, total, gen, real=True):
        self.rows, self.total, self.gen, self.real = torch.tensor(list(rows), dtype=torch.long), total, gen, real

    def rand(self, *shape):
        return torch.rand(self.total, *shape, generator=self.gen)[self.rows]

    def randint(self, high, *shape):
        return torch.randint(0, high, (self.total, *shape), generator=self.gen)[self.rows]

    def randn(self, *shape):
        return torch.randn(self.total, *shape, generator=self.gen)[self.rows]

    def coin(self, p):
        """One draw shared by the whole global batch (the published per-batch conditioning dropout)."""
        return bool(torch.rand((), generator=self.gen) < p)


MASK32 = 0xFFFFFFFF


def mul32(h, c):
    """(h * c) mod 2^32 for h in [0, 2^32) (an int64 tensor or an int) and a constant c < 2^32, every
    product < 2^49 (int64 overflow is never relied on)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def fmix32(h):
    """MurmurHash3's finaliser: a bijection of [0, 2^32) whose outputs look independent for nearby inputs."""
    h = h ^ (h >> 16)
    h = mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


class SampleDropout:
    """`blocks.mask_source` for one micro-batch's forward: element e of sample i (global position rows[i])
    in the c-th dropout call is kept where hash(seed, rows[i], c, e) / 2^32 >= p. The masks depend on the
    global position alone, not on how the batch is split, and need no generator state. One object for the
    whole run (`reset` per micro-batch), so a compiled model sees the same callable every step."""

    def __init__(self):
        self.keys, self.calls = None, 0

    def reset(self, seed, rows, device):
        keys = [seed_of(seed, int(r)) & MASK32 for r in rows]
        self.keys = torch.tensor(keys, dtype=torch.int64, device=device)      # (n,)
        self.calls = 0

    def __call__(self, x, p):
        c = fmix32(self.calls * 0x9E3779B9 & MASK32)                       # a Python int: this call's key
        self.calls += 1
        e = torch.arange(x[0].numel(), device=x.device, dtype=torch.int64) & MASK32     # (m,) within a sample
        h = fmix32(fmix32(self.keys[:len(x), None] ^ c) ^ e)                          # (n, m)
        keep = (h >= int(p * 2 ** 32)).view(x.shape)
        return x * keep.to(x.dtype) / (1 - p)


MASKS = SampleDropout()
REAL = True         # False while a placeholder runs: `GlobalBatchNorm` counts none of its rows


@contextmanager
def micro_batch(seed, s, device):
    """The forward of the micro-batch of Slice s: the model's dropout draws `SampleDropout` masks for its
    global positions, and the batch norm weights its rows 0 where it is a placeholder."""
    global REAL
    MASKS.reset(seed, s.rows, device)
    blocks.mask_source, REAL = MASKS, s.real
    try:
        yield
    finally:
        blocks.mask_source, REAL = None, True


class GlobalBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over every process's batch (all-reduced sums, with
    gradients flowing back to every process): SyncBatchNorm's semantics, also on the CPU (gloo), where
    torch's SyncBatchNorm refuses to run. Same parameters and buffers as BatchNorm2d. A placeholder's rows
    (`REAL` False: a process with no good sample) add 0 to the sums and the count, yet take part in every
    all-reduce, forward and backward; a process's rows are all real or all placeholder."""

    def forward(self, x):                                             # x (B, C, H, W)
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        w = 1.0 if REAL else 0.0                                          # x * 1.0 is exactly x
        count = torch.tensor([x.numel() // x.shape[1] * w], device=x.device, dtype=torch.float64)
        dist.all_reduce(count)
        n = count.item()                                                  # > 0: some process has a sample
        mean = all_reduce(x.float().sum((0, 2, 3)) * w) / n               # (C,)
        d = x.float() - mean[None, :, None, None]
        var = all_reduce(d.square().sum((0, 2, 3)) * w) / n               # biased, as used to normalise
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / max(n - 1, 1), self.momentum)
        y = d * torch.rsqrt(var + self.eps)[None, :, None, None]
        return (y * self.weight[None, :, None, None] + self.bias[None, :, None, None]).to(x.dtype)


def global_batch_norm(model):
    """Every BatchNorm2d of model normalises over the global batch (in place: same state dict)."""
    for m in model.modules():
        if type(m) is torch.nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm
    return model


def gather_rows(x):
    """Every process's rows of x (n_r, D), concatenated in rank order: the global batch's order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    most = max(int(s) for s in sizes)
    padded = torch.cat([x, x.new_zeros(most - len(x), *x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)])


def gather_objects(obj):
    """[every process's obj] in rank order (one small collective; [obj] with one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def gather_sums(sums):
    """{metric: sum over samples} added over every process (one small collective)."""
    total = {}
    for part in gather_objects(sums):
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + v
    return total


def borrow(batch, counts):
    """This process's micro-batch, or, where it has no good sample (counts: every process's), a placeholder:
    the first good sample of the first process that has one, of the right kind and shape for any recipe.
    A collective: every process calls it where some has none."""
    src = next(r for r, c in enumerate(counts) if c)
    box = [{k: v[:1] for k, v in batch.items()} if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return batch if counts[dist.get_rank()] else box[0]


def wrap(model, device, world, fsdp, compile):
    """What the loop calls: the model under DDP (several processes, no FSDP), compiled if asked."""
    if world > 1 and not fsdp:
        global_batch_norm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None, find_unused_parameters=True)
    return torch.compile(model) if compile else model


def shard(model, device, world):
    """FSDP2: every block of the model's ModuleLists is a unit, then the root (before the optimizer)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (world,))
    for m in list(model.modules()):
        if isinstance(m, torch.nn.ModuleList):
            for child in m:
                if not isinstance(child, torch.nn.ModuleList):
                    fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_states(model, opt, fsdp):
    """Unsharded (model, optimizer) state dicts; under FSDP gathered to rank 0's CPU (a collective)."""
    if not fsdp:
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options)


def load_optimizer(model, opt, state, fsdp):
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)
