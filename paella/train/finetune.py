"""LoRA fine-tuning (`paella finetune`): the generator recipe on a trained pipeline, where only LoRA
adapters (`paella.lora`) learn and the base generator stays bit for bit as it was.

Everything else is the generator recipe's and the loop's: the same loss, data (folders, shards,
pre-encoded files; bad samples skipped), bf16 autocast, gradient accumulation, EMA, sample grids, exact
resume and any number of processes. The base pipeline gives the generator, its VQGAN and its text
encoder. The run folder's ``model/`` (and ``ema/`` with --ema) are adapter folders, a couple of MB, that
``paella generate --lora`` and `Pipeline.load_lora` take; checkpoints hold the whole state to resume.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .. import lora
from ..model import Paella
from .recipes import GeneratorConfig, GeneratorTask


@dataclass
class FinetuneConfig(GeneratorConfig):
    recipe: ClassVar[str] = 'lora'
    hidden: ClassVar[tuple] = ('preset', 'model', 'init', 'freeze', 'text_encoder', 'critic_weight')   # full training's
    base: str = ''                  # the pipeline folder to adapt (default: the emoji model in the package)
    out: str = 'runs/lora'          # checkpoints; model/ (and ema/) are the adapter folders
    rank: int = 8                   # LoRA rank: the update of each target layer is B A, A (rank, in)
    alpha: float = 0.0              # updates scaled by alpha / rank (0: alpha = rank, a scale of 1)
    targets: str = ','.join(lora.DEFAULT_TARGETS)   # layer names (or dotted suffixes) that get an adapter
    lora_dropout: float = 0.0       # dropout on the adapters' input
    batch_size: int = 16            # global, over all processes and accumulation steps
    steps: int = 500                # optimizer steps in all (a resumed run continues to this)
    lr: float = 1e-3                # AdamW learning rate after the warm-up (LoRA takes larger ones)
    warmup: int = 50                # steps of linear learning-rate warm-up
    weight_decay: float = 0.0       # AdamW's decoupled weight decay (none: B starts at zero for a reason)
    save_every: int = 100           # steps per checkpoint (and at the end)

    def check(self, world):
        super().check(world)
        if self.init or self.freeze or self.model or self.critic_weight:
            raise ValueError("finetune adapts --base (a pipeline folder): --init, --freeze, --model.* and "
                             "--critic-weight are for full training (paella train)")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"--rank must be an integer >= 1, got {self.rank!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout!r}")


class FinetuneTask(GeneratorTask):
    """The generator task on the base pipeline's generator, VQGAN and text encoder, with LoRA adapters."""

    def __init__(self, cfg, device):
        from ..loading import default_model_path
        from ..settings import PIPELINE_NAME, read_meta
        self.base = Path(cfg.base) if cfg.base else default_model_path()
        if not (self.base / PIPELINE_NAME).is_file():
            raise ValueError(f"--base {self.base} is not a pipeline folder (no {PIPELINE_NAME})")
        self.meta = read_meta(self.base / PIPELINE_NAME)
        cfg.vqgan = cfg.vqgan or str(self.base / 'vqgan')
        super().__init__(cfg, device)

    def text_spec(self):
        return self.meta['text_encoder']

    def build_model(self, overrides):
        model = Paella.from_pretrained(self.base / 'generator', dtype=torch.float32)
        if overrides.get('byt5_embd', model.config.byt5_embd) != model.config.byt5_embd:
            raise ValueError(f"{self.cfg.data}'s text states are {overrides['byt5_embd']} wide; the base "
                             f"generator reads {model.config.byt5_embd}: encode the data with the base's encoder")
        c = self.cfg
        self.lora = lora.config(c.rank, c.alpha or None, c.targets, c.lora_dropout, base=lora.base_digest(model))
        return lora.attach(model, self.lora)

    def state_dict(self):
        return {'base': self.lora.base_model_name_or_path}

    def load_state_dict(self, sd):
        """A run resumed with another --base would go on training the old base's adapter (the checkpoint
        holds its weights) under the new base's name: refused."""
        if sd.get('base') != self.lora.base_model_name_or_path:
            raise ValueError(f"--out {self.cfg.out} adapts another generator ({sd.get('base')}) than --base "
                             f"{self.base} ({self.lora.base_model_name_or_path}): choose another --out")

    def export(self, model, folder, state_dict):
        lora.save(folder, self.lora, state_dict)

    export_file = lora.ADAPTER_WEIGHTS

    def export_state(self, state_dict):
        return {k: v.float() for k, v in lora.adapter_state(state_dict).items()}
