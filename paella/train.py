"""One trainer for the generator, the VQGAN and the prior: 1 CPU, 1 GPU, or N GPUs on M nodes (torchrun).

Distributed training is detected from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK);
rank 0 alone logs and saves. Every random draw of a step comes from a generator seeded by (seed, step),
drawn for the whole global batch and sliced per rank, and the data order is a pure function of
(seed, position): so a run resumed from a checkpoint, or split over more processes, computes the same
updates as one uninterrupted process (model dropout aside, which uses the per-rank global RNG).
"""
import copy
import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import atomic_write
from .data import ImageFolder, Preencoded, StepSampler, collate, is_shards, webdataset_images
from .model import Paella, text_pool
from .noise import add_noise, check_token_range, loss_weight
from .prior import CosineSchedule, PriorModel
from .vq import VQModel


@dataclass
class TrainConfig:
    model: str = 'generator'        # 'generator' | 'vqgan' | 'prior'
    data: str = ''                  # image folder, webdataset shards (.tar, {000..099}.tar), or a
                                    # pre-encoded .safetensors file (paella preencode)
    filters: str = ''               # shards: JSON of webdataset_filter options, e.g. '{"min_size": 512}'
    out: str = 'runs/paella'
    preset: str = 'small'           # model size preset
    model_config: str = ''          # JSON of model config overrides, e.g. '{"c_cond": 512}'
    init: str = ''                  # start from these weights (a model folder) instead of random ones
    freeze: str = ''                # parameters to keep fixed: comma-separated name prefixes, e.g.
                                    # 'in_block,down_blocks,vquantizer' trains a VQGAN's decoder alone
    vqgan: str = ''                 # generator on raw images: the frozen VQGAN's folder
    text_encoder: str = 'minilm'    # generator on raw images: 'minilm' or 'byt5:<path>'
    image_size: int = 64
    batch_size: int = 32            # global, over all processes and accumulation steps
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 3e-4
    warmup: int = 100
    lr_schedule: str = 'constant'   # after the warm-up: 'constant' (published) or 'cosine' (to lr / 10)
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    precision: str = 'bf16'         # 'fp32' | 'bf16' | 'fp16' (with a grad scaler)
    ema: float = 0.0                # EMA decay of the weights (0: no EMA)
    ema_start: int = 0              # copy the weights into the EMA until this step
    compile: bool = False
    fsdp: bool = False              # shard parameters, gradients and optimizer state over processes
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    save_every: int = 500
    keep: int = 3                   # checkpoints kept
    sample_every: int = 0           # generator: a sample grid every this many steps (0: never)
    tensorboard: bool = True
    wandb: str = ''                 # a wandb project name to log to (optional)
    # generator
    label_smoothing: float = 0.1
    min_loss_weight: float = 0.3
    p_uncond_text: float = 0.05     # empty prompt instead of the caption
    p_drop_tokens: float = 0.0      # pooled_text models: the empty prompt's token states but the caption's
                                    # pooled vector, per sample (the model learns to draw from the pooled one)
    p_drop_clip: float = 0.9        # CLIP text embedding of the empty prompt instead of the caption's
    p_drop_clip_image: float = 0.9  # no CLIP image embedding
    # vqgan
    commit_weight: float = 0.25
    l1_weight: float = 1.0          # reconstruction loss = l1_weight * L1 + MSE (0: MSE alone, what PSNR measures)
    dead_code_every: int = 20       # restart codes unused for this many steps (0: never)
    # prior
    p_uncond_prior: float = 0.1


PRESETS = {
    'generator': dict(model='generator', preset='small', lr=3e-4, warmup=200, batch_size=32),
    'vqgan': dict(model='vqgan', preset='small', lr=3e-4, warmup=100, batch_size=32, weight_decay=0.0),
    'prior': dict(model='prior', preset='small', lr=3e-4, warmup=100, batch_size=64, grad_clip=5.0, ema=0.999),
}


def parse_overrides(cfg, args):
    """Apply ``--key=value`` strings to a config; values parse as JSON where they can."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for arg in args:
        if not arg.startswith('--') or '=' not in arg:
            raise ValueError(f"expected --key=value, got {arg!r}")
        key, value = arg[2:].split('=', 1)
        key = key.replace('-', '_')
        if key not in fields:
            raise ValueError(f"unknown setting {key!r}; settings: {', '.join(sorted(fields))}")
        default = getattr(cfg, key)
        if isinstance(default, str):
            changes[key] = value
        else:
            try:
                v = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError(f"--{key}: {value!r} is not a {type(default).__name__}") from None
            changes[key] = tuple(v) if isinstance(default, tuple) else type(default)(v) \
                if isinstance(default, (int, float)) and not isinstance(default, bool) else v
    return dataclasses.replace(cfg, **changes)


def _seed(*parts):
    """A 63-bit seed from integers, stable across processes and runs."""
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


def image_dataset(cfg):
    """An image folder (map-style: exact resume) or webdataset shards (an endless resampled stream)."""
    if is_shards(cfg.data):
        return webdataset_images(cfg.data, cfg.image_size, seed=cfg.seed, **json.loads(cfg.filters or '{}'))
    return ImageFolder(cfg.data, cfg.image_size, seed=cfg.seed)


class Task:
    """A recipe: builds ``model`` and ``dataset``; ``loss`` per micro-batch; optional per-step work and state."""

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass

    def after_step(self, step, model):
        pass


class GeneratorTask(Task):
    """Paella's recipe: frozen-VQGAN tokens, t ~ U(0, 1], random-token replacement, weighted cross-entropy."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        data = Path(cfg.data)
        if data.suffix == '.safetensors':
            self.dataset = Preencoded(data)
            self.uncond = self.dataset.extras.get('uncond_text')
            width = self.dataset.tensors['text'].shape[-1]
            self.vqgan_path = cfg.vqgan or self.dataset.meta.get('vqgan', '')
            self.encoder = None
        else:
            if not cfg.vqgan:
                raise ValueError("training the generator on images needs --vqgan=<VQGAN folder> "
                                 "(or pre-encode the data with `paella preencode`)")
            from .conditioning import EmbeddingCache, byt5_encoder, minilm_encoder
            self.dataset = image_dataset(cfg)
            kind, _, path = cfg.text_encoder.partition(':')
            self.encoder = minilm_encoder(device=device) if kind == 'minilm' else byt5_encoder(path, device=device)
            self.cache = EmbeddingCache(Path(cfg.out) / 'text-cache')
            self.uncond = self.encoder.encode(['']).states.cpu()
            width = self.encoder.width
            self.vqgan_path = cfg.vqgan
        self.vqgan = None if not self.vqgan_path else \
            VQModel.from_pretrained(self.vqgan_path, device=device, dtype=torch.float32).requires_grad_(False)
        overrides = json.loads(cfg.model_config or '{}')
        if self.vqgan is not None:
            overrides.setdefault('num_labels', self.vqgan.codebook_size)
        overrides.setdefault('byt5_embd', width)
        self.model = Paella(Paella.make_config(cfg.preset, **overrides))
        if 'tokens' in getattr(self.dataset, 'tensors', {}):     # pre-encoded: checked once, not per step
            check_token_range(self.dataset.tensors['tokens'], self.model.num_labels)

    def loss(self, model, batch, s):
        cfg, dev = self.cfg, self.device
        with torch.no_grad():
            if 'tokens' in batch:
                tokens, text = batch['tokens'].long(), batch['text'].float()
            else:
                tokens = self.vqgan.encode_indices(batch['image'].to(dev)).cpu()
                text = self.cache.text(self.encoder, batch['caption']).states
            u = self.uncond.float()[:, :text.shape[1]]                            # (1, L', D), L' <= L
            u = F.pad(u, (0, 0, 0, text.shape[1] - u.shape[1]))                    # (1, L, D)
            if s.coin(cfg.p_uncond_text):
                text = u.expand_as(text)
            clip = batch.get('clip')
            if clip is not None and s.coin(cfg.p_drop_clip):
                clip = self.dataset.extras['uncond_clip'].expand(len(clip), -1)
            elif clip is None and self.model.config.pooled_text:
                clip = text_pool(text)                                              # (b, D)
                drop = (s.rand() < cfg.p_drop_tokens)[:, None, None]                # (b, 1, 1)
                text = torch.where(drop, u, text)
            clip_image = batch.get('clip_image')
            if clip_image is not None and s.coin(cfg.p_drop_clip_image):
                clip_image = None
            b, h, w = tokens.shape
            t = (1 - s.rand()).add(0.001).clamp(0.001, 1.0)                       # (b,)
            mask = (s.rand(h, w) <= t[:, None, None]).long()                       # (b, h, w)
            noised, mask = add_noise(tokens, t, self.model.num_labels, mask=mask,
                                     random_x=s.randint(self.model.num_labels, h, w))
            weight = loss_weight(t, mask, cfg.min_loss_weight).to(dev)
        def to(x):
            return None if x is None else x.to(dev)
        logits = model(to(noised), to(t), to(text), to(clip), to(clip_image))       # (b, K, h, w)
        ce = F.cross_entropy(logits.float(), to(tokens), label_smoothing=cfg.label_smoothing, reduction='none')
        loss = ((ce * weight).sum(dim=(1, 2)) / weight.sum(dim=(1, 2))).mean()
        acc = (logits.argmax(1) == to(tokens)).float().mean()
        return loss, {'acc': acc.item()}

    @torch.no_grad()
    def samples(self, model, step, out):
        """A grid of samples for the first 8 captions of the data (needs the VQGAN)."""
        from .images import save_images, tokens_to_images
        from .sampler import sample
        if self.vqgan is None or not isinstance(self.dataset, Preencoded):
            return
        n = min(8, len(self.dataset))
        text = self.dataset.tensors['text'][:n].float().to(self.device)
        h, w = self.dataset.tensors['tokens'].shape[1:]
        uncond = {'byt5': self.uncond.float().to(self.device).expand(n, -1, -1)}
        tokens = sample(model, {'byt5': text}, (n, h, w), uncond, steps=12, cfg=3.0,
                        generator=torch.Generator(self.device).manual_seed(0))
        target = self.dataset.tensors['tokens'][:n].long().to(self.device)
        save_images(tokens_to_images(self.vqgan, torch.cat([tokens, target])), out / f'samples/{step:07d}.png', True)


class VQTask(Task):
    """Reconstruction (l1_weight * L1 + MSE) + codebook and commitment losses, with dead-code restarts."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.pairs = cfg.data.endswith('.safetensors')
        if self.pairs:
            # `paella restored-pairs`: given tokens -> their image; the encoder and codebook take no part.
            self.dataset = Preencoded(cfg.data)
            if not {'tokens', 'image'} <= set(self.dataset.tensors):
                raise ValueError(f"{cfg.data} needs 'tokens' and 'image' tensors (paella restored-pairs) "
                                 "to train a VQGAN on it")
            if not cfg.freeze:
                raise ValueError("training on token/image pairs trains the decoder alone: "
                                 "pass --freeze=in_block,down_blocks,vquantizer")
        else:
            self.dataset = image_dataset(cfg)
        self.model = VQModel(VQModel.make_config(cfg.preset, **json.loads(cfg.model_config or '{}')))
        self.usage = torch.zeros(self.model.codebook_size, dtype=torch.long)
        self.latents = None

    def state_dict(self):
        return {'usage': self.usage}

    def load_state_dict(self, sd):
        self.usage = sd['usage']

    def loss(self, model, batch, s):
        if self.pairs:
            x = batch['image'].to(self.device).float() / 255                # (b, 3, H, W)
            recon = model(indices=batch['tokens'].long().to(self.device))
            loss, metrics = 0, {}
        else:
            x = batch['image'].to(self.device)
            recon, (codebook, commitment), idx, latent = model(x, details=True)   # through DDP, if any
            # the codebook loss moves the codes toward the encoder's outputs; the commitment loss (weighted)
            # moves the encoder's outputs toward their codes
            loss = codebook + self.cfg.commit_weight * commitment
            counts = torch.bincount(idx.flatten().cpu(), minlength=self.usage.numel())
            self.usage += counts
            self.latents = (latent * self.model.scale_factor).detach().permute(0, 2, 3, 1).reshape(-1, latent.shape[1])
            p = counts.float() / counts.sum()
            metrics = {'used': int((counts > 0).sum()),
                       'perplexity': float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))}
        loss = loss + self.cfg.l1_weight * F.l1_loss(recon.float(), x) + F.mse_loss(recon.float(), x)
        mse = F.mse_loss(recon.detach().float().clamp(0, 1), x)
        return loss, {'psnr': (10 * torch.log10(1 / mse)).item(), **metrics}

    @torch.no_grad()
    def after_step(self, step, model):
        every = self.cfg.dead_code_every
        if not every or (step + 1) % every or not model.vquantizer.codebook.weight.requires_grad:
            return
        usage = self.usage.to(self.device)
        if dist.is_initialized():
            dist.all_reduce(usage)
        codebook = model.vquantizer.codebook.weight
        dead = (usage == 0).nonzero()[:, 0]
        if len(dead) and self.latents is not None:
            # Restart each dead code at an encoder output of this batch, picked by the step's seed.
            g = torch.Generator().manual_seed(_seed(self.cfg.seed, step, 7))
            pick = torch.randint(0, len(self.latents), (len(dead),), generator=g).to(self.latents.device)
            codebook.data[dead] = self.latents[pick].to(codebook.dtype)
            if dist.is_initialized():
                dist.broadcast(codebook.data, src=0)
        self.usage.zero_()


class PriorTask(Task):
    """Noise prediction on CLIP image embeddings noised with the cosine schedule, given text embeddings."""

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.dataset = Preencoded(cfg.data)
        if not {'clip_text', 'clip_image'} <= set(self.dataset.tensors):
            raise ValueError(f"{cfg.data} needs 'clip_text' and 'clip_image' tensors to train the prior")
        overrides = json.loads(cfg.model_config or '{}')
        overrides.setdefault('clip_r', self.dataset.tensors['clip_text'].shape[1])
        self.model = PriorModel(PriorModel.make_config(cfg.preset, **overrides))
        self.schedule = CosineSchedule()

    def loss(self, model, batch, s):
        dev = self.device
        image, text = batch['clip_image'].float(), batch['clip_text'].float()
        if s.coin(self.cfg.p_uncond_prior):
            text = torch.zeros_like(text)
        t = 1 - s.rand()
        noised, noise = self.schedule.diffuse(image, t, s.randn(image.shape[1]))
        loss = F.mse_loss(model(noised.to(dev), t.to(dev), text.to(dev)).float(), noise.to(dev))
        return loss, {}


TASKS = {'generator': GeneratorTask, 'vqgan': VQTask, 'prior': PriorTask}


def setup_distributed():
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
        raise ValueError(f"--init={folder} does not fit this model: " +
                         '; '.join((wrong + [f"{k} not in the model" for k in unknown])[:10]))
    new = sorted(set(mine) - set(state))
    model.load_state_dict(state, strict=False)
    if new and log:
        print(f"init: {len(state)} tensors from {folder}; {len(new)} new ones start as built "
              f"({', '.join(new[:4])}{', ...' if len(new) > 4 else ''})")


def checkpoints(out):
    return sorted((Path(out) / 'checkpoints').glob('step_*.pt'))


class Logger:
    """Rank 0: metrics.jsonl always, TensorBoard and wandb when available and asked for."""

    def __init__(self, cfg, out, resume_step):
        self.file = open(out / 'metrics.jsonl', 'a')
        self.tb = self.wandb = None
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

    def log(self, step, metrics):
        self.file.write(json.dumps({'step': step, **metrics}) + '\n')
        self.file.flush()
        for k, v in metrics.items():
            if self.tb is not None and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def train(cfg: TrainConfig):
    """Train until cfg.steps, resuming from the newest checkpoint in cfg.out if there is one."""
    rank, world, device = setup_distributed()
    out = Path(cfg.out)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum "
                         f"= {world} x {cfg.grad_accum}")
    if cfg.precision not in ('fp32', 'bf16', 'fp16'):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {cfg.precision!r}")
    fsdp = cfg.fsdp and world > 1
    if fsdp and (cfg.ema or cfg.model == 'vqgan'):
        raise ValueError("fsdp is for the generator and the prior, without ema (keep ema=0)")
    torch.manual_seed(cfg.seed)                        # identical initial weights on every rank
    task = TASKS[cfg.model](cfg, device)
    model = task.model
    if cfg.init:
        init_from(model, cfg.init, log=rank == 0)
    ck = torch.load(checkpoints(out)[-1], map_location='cpu', weights_only=True) if checkpoints(out) else None
    if ck is not None:
        model.load_state_dict(ck['model'])
    if cfg.freeze and not any(_frozen(n, cfg.freeze) for n, _ in model.named_parameters()):
        raise ValueError(f"freeze={cfg.freeze!r} matches no parameter of the {cfg.model}")
    for n, p in model.named_parameters():
        p.requires_grad_(not _frozen(n, cfg.freeze))
    train_mode(model, cfg.freeze)
    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema else None
    if fsdp:
        shard(model, device, world)                    # before the optimizer sees the parameters
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas,
                            weight_decay=cfg.weight_decay,
                            fused=device.type == 'cuda')
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == 'fp16')

    start = 0
    if ck is not None:
        if ema is not None and ck.get('ema') is not None:
            ema.load_state_dict(ck['ema'])
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, opt, ck['optimizer'], options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(ck['optimizer'])
        sched.load_state_dict(ck['scheduler'])
        scaler.load_state_dict(ck['scaler'])
        task.load_state_dict(ck['task'])
        torch.set_rng_state(ck['rng']['torch'])
        start = ck['step']
        if rank == 0:
            print(f"resuming from {checkpoints(out)[-1]} at step {start}")
        del ck
    if start >= cfg.steps:
        return model

    wrapped = model
    if world > 1 and not fsdp:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None, find_unused_parameters=True)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    micro_global = cfg.batch_size // cfg.grad_accum
    local = micro_global // world
    if isinstance(task.dataset, torch.utils.data.IterableDataset):
        # A resampled shard stream: shuffled per worker and node; resumes with fresh draws, not exactly.
        loader = torch.utils.data.DataLoader(task.dataset, batch_size=local, collate_fn=collate,
                                             num_workers=cfg.num_workers)
    else:
        sampler = StepSampler(len(task.dataset), micro_global, rank, world, cfg.seed, start * cfg.grad_accum)
        loader = torch.utils.data.DataLoader(task.dataset, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    batches = iter(loader)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if cfg.precision == 'bf16' else torch.float16)
                if cfg.precision != 'fp32' else nullcontext())

    logger = None
    if rank == 0:
        (out / 'checkpoints').mkdir(parents=True, exist_ok=True)
        atomic_write(out / 'config.json', lambda p: Path(p).write_text(json.dumps(asdict(cfg), indent=2)))
        logger = Logger(cfg, out, start)
    from tqdm import tqdm
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=rank != 0, dynamic_ncols=True,
               mininterval=1.0)
    skipped, seen, t0, window = 0, 0, time.perf_counter(), {}
    for step in bar:
        torch.manual_seed(_seed(cfg.seed, step, rank, 1))   # dropout; everything else draws from `s`
        totals = {}
        for micro in range(cfg.grad_accum):
            batch, bad = next(batches)
            if bad and rank == 0:
                with open(out / 'skipped.log', 'a') as f:
                    f.writelines(f'step {step}: {name}: {why}\n' for name, why in bad)
            skipped += sum(1 for _, why in bad if not why.startswith('caption'))
            n = len(next(iter(batch.values()))) if batch else 0
            s = Slice(rank * local, n, micro_global, torch.Generator().manual_seed(_seed(cfg.seed, step, micro)))
            last = micro == cfg.grad_accum - 1
            if fsdp:
                model.set_requires_gradient_sync(last)
            sync = nullcontext() if world == 1 or fsdp or last else wrapped.no_sync()
            with sync:
                if n:
                    with autocast:
                        loss, m = task.loss(wrapped, batch, s)
                else:       # every sample of this slice was bad: join the gradient all-reduce with zeros
                    loss, m = sum(p.sum() for p in model.parameters()) * 0.0, {}
                scaler.scale(loss / cfg.grad_accum).backward()
            seen += n * world
            for k, v in {'loss': loss.item(), **m}.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, 'full_tensor') else grad_norm
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=True)
        task.after_step(step, model)
        if ema is not None:
            with torch.no_grad():
                decay = 0.0 if step < cfg.ema_start else cfg.ema
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm.detach(), 1 - decay)
        done = step + 1
        if rank == 0:
            for k, v in {**totals, 'grad_norm': float(grad_norm)}.items():
                window.setdefault(k, []).append(v)
            if done % cfg.log_every == 0 or done == cfg.steps:     # means over the steps since the last log
                metrics = {k: sum(v) / len(v) for k, v in window.items()}
                metrics.update(lr=sched.get_last_lr()[0], samples_per_s=seen / (time.perf_counter() - t0),
                               skipped=skipped)
                window = {}
                logger.log(done, metrics)
                bar.set_postfix({k: f'{v:.4g}' if isinstance(v, float) else v for k, v in metrics.items()},
                                refresh=False)
        if done % cfg.save_every == 0 or done == cfg.steps:
            states = full_states(model, opt, fsdp)     # a collective under FSDP: every rank takes part
            if rank == 0:
                save_checkpoint(out, done, model, ema, *states, sched, scaler, task, cfg)
        if rank == 0 and cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps) \
                and hasattr(task, 'samples'):
            task.samples((ema if ema is not None else model).eval(), done, out)
            train_mode(model, cfg.freeze)
    if rank == 0:
        logger.close()
        if skipped:
            print(f"skipped {skipped} bad samples; see {out / 'skipped.log'}")
    if world > 1:
        dist.barrier()
    return model


def _frozen(name, freeze):
    return any(name == f or name.startswith(f + '.') for f in freeze.split(',') if f)


def train_mode(model, freeze=''):
    """model.train(), except frozen modules stay in eval mode: their batch-norm statistics stay fixed too."""
    model.train()
    for name, module in model.named_modules():
        if name and _frozen(name, freeze):
            module.eval()
    return model


def lr_factor(cfg, step):
    """Linear warm-up, then constant or a cosine decay to a tenth at cfg.steps."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.lr_schedule == 'cosine':
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.lr_schedule != 'constant':
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    return 1.0


def shard(model, device, world):
    """FSDP2: every block of the model's ModuleLists is a unit, then the root."""
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
    """Unsharded (model, optimizer) state dicts; under FSDP gathered to rank 0's CPU."""
    if not fsdp:
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options)


def save_checkpoint(out, step, model, ema, model_state, opt_state, sched, scaler, task, cfg):
    """Full training state (atomically), the last `keep` of them, plus exported model folders."""
    state = {'step': step, 'model': model_state, 'ema': ema.state_dict() if ema is not None else None,
             'optimizer': opt_state, 'scheduler': sched.state_dict(), 'scaler': scaler.state_dict(),
             'task': task.state_dict(), 'config': asdict(cfg), 'model_config': asdict(model.config),
             'rng': {'torch': torch.get_rng_state()}}
    path = Path(out) / 'checkpoints' / f'step_{step:07d}.pt'
    atomic_write(path, lambda p: torch.save(state, p))
    for old in checkpoints(out)[:-cfg.keep]:
        old.unlink()
    model.save_pretrained(Path(out) / 'model', state_dict=model_state)
    if ema is not None:
        ema.save_pretrained(Path(out) / 'ema')


def main(model_type, argv):
    cfg = parse_overrides(TrainConfig(**PRESETS[model_type]), argv)
    if not cfg.data:
        raise ValueError("--data=<image folder or pre-encoded .safetensors> is required")
    train(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
