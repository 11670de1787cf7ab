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
    """This rank's rows [lo, lo + n) of the global micro-batch of size total."""

    def __init__(self, lo, n, total, gen):
        self.lo, self.n, self.total, self.gen = lo, n, total, gen

    def rand(self, *shape):
        return torch.rand(self.total, *shape, generator=self.gen)[self.lo:self.lo + self.n]

    def randint(self, high, *shape):
        return torch.randint(0, high, (self.total, *shape), generator=self.gen)[self.lo:self.lo + self.n]

    def randn(self, *shape):
        return torch.randn(self.total, *shape, generator=self.gen)[self.lo:self.lo + self.n]

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
    """`blocks.mask_source` for one micro-batch's forward: element e of sample i (global position lo + i)
    in the c-th dropout call is kept where hash(seed, lo + i, c, e) / 2^32 >= p. The masks depend on the
    global position alone, not on how the batch is split, and need no generator state. One object for the
    whole run (`reset` per micro-batch), so a compiled model sees the same callable every step."""

    def __init__(self):
        self.keys, self.calls = None, 0

    def reset(self, seed, lo, n, device):
        keys = [seed_of(seed, lo + i) & MASK32 for i in range(n)]
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


@contextmanager
def sample_dropout(seed, lo, n, device):
    """The model's dropout inside this block draws `SampleDropout` masks for global positions lo..lo+n."""
    MASKS.reset(seed, lo, n, device)
    blocks.mask_source = MASKS
    try:
        yield
    finally:
        blocks.mask_source = None


class GlobalBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over every process's batch (all-reduced sums, with
    gradients flowing back to every process): SyncBatchNorm's semantics, also on the CPU (gloo), where
    torch's SyncBatchNorm refuses to run. Same parameters and buffers as BatchNorm2d."""

    def forward(self, x):                                             # x (B, C, H, W)
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        count = torch.tensor([x.numel() // x.shape[1]], device=x.device, dtype=torch.float64)
        dist.all_reduce(count)
        n = count.item()
        mean = all_reduce(x.float().sum((0, 2, 3))) / n                   # (C,)
        d = x.float() - mean[None, :, None, None]
        var = all_reduce(d.square().sum((0, 2, 3))) / n                   # biased, as used to normalise
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


def gather_lists(items):
    """Every process's list, concatenated in rank order (bad samples: rank 0 names them all)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def gather_sums(n, sums):
    """(samples, {metric: sum over samples}) added over every process (one small collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return n, sums
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (n, sums))
    total = {}
    for _, s in parts:
        for k, v in s.items():
            total[k] = total.get(k, 0.0) + v
    return sum(p[0] for p in parts), total


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
