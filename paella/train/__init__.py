"""Training: one loop (engine.py) for four recipes (recipes.py, and LoRA fine-tuning in finetune.py), at any
scale (distributed.py), with checkpoints that lose nothing (state.py), and the data prepared once before
(prepare.py)."""
from .config import TrainConfig
from .engine import RECIPES, train
from .finetune import FinetuneConfig
from .prepare import preencode, restored_pairs
from .recipes import GeneratorConfig, PriorTrainConfig, VQGANConfig

__all__ = ['TrainConfig', 'GeneratorConfig', 'VQGANConfig', 'PriorTrainConfig', 'FinetuneConfig', 'RECIPES', 'train',
           'preencode', 'restored_pairs']
