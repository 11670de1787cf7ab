"""Paella: text-to-image generation in a quantized latent space (arXiv 2211.07292).

``from paella import Pipeline`` and the rest of ``__all__`` work as usual; each name is imported on first
use, so ``import paella`` (and the command line's start-up) costs nothing it does not use.
"""
from typing import TYPE_CHECKING

__version__ = '0.1.0'

__all__ = ['CheckpointError', 'Paella', 'PaellaConfig', 'Pipeline', 'PriorConfig', 'PriorModel', 'Settings',
           'VQConfig', 'VQModel', 'add_noise', 'loss_weight', 'read_state_dict', 'sample']

_HOME = {'CheckpointError': 'checkpoint', 'read_state_dict': 'checkpoint', 'Paella': 'model',
         'PaellaConfig': 'model', 'add_noise': 'noise', 'loss_weight': 'noise', 'Pipeline': 'pipeline',
         'Settings': 'settings', 'PriorConfig': 'prior', 'PriorModel': 'prior', 'sample': 'sampler',
         'VQConfig': 'vq', 'VQModel': 'vq'}

if TYPE_CHECKING:                     # what editors and type checkers see; never run
    from .checkpoint import CheckpointError, read_state_dict
    from .model import Paella, PaellaConfig
    from .noise import add_noise, loss_weight
    from .pipeline import Pipeline
    from .prior import PriorConfig, PriorModel
    from .sampler import sample
    from .settings import Settings
    from .vq import VQConfig, VQModel


def __getattr__(name):
    if name in _HOME:
        import importlib
        return getattr(importlib.import_module(f'.{_HOME[name]}', __name__), name)
    raise AttributeError(f"module 'paella' has no attribute {name!r}")
