"""Training: one loop (engine.py) for three recipes (recipes.py), at any scale (distributed.py), with
checkpoints that lose nothing (state.py), and the data prepared once before (prepare.py)."""
from .config import TrainConfig
from .engine import train
from .prepare import preencode, restored_pairs
from .recipes import RECIPES, GeneratorConfig, PriorTrainConfig, VQGANConfig

__all__ = ['TrainConfig', 'GeneratorConfig', 'VQGANConfig', 'PriorTrainConfig', 'RECIPES', 'train', 'preencode',
           'restored_pairs']
