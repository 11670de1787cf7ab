"""One process, or many under torchrun: the rank and device, the step's random draws, FSDP2 sharding.

Every random draw of a step comes from a generator seeded by (seed, step, micro-batch), drawn for the
whole global batch and sliced per rank; so a run resumed from a checkpoint, or split over more
processes, computes the same updates as one uninterrupted process (model dropout aside, which uses the
per-rank global RNG).
"""
import os

import torch
import torch.distributed as dist


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


def wrap(model, device, world, fsdp, compile):
    """What the loop calls: the model under DDP (several processes, no FSDP), compiled if asked."""
    if world > 1 and not fsdp:
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
