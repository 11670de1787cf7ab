"""Paella: text-to-image generation in a quantized latent space (arXiv 2211.07292).

Names are imported lazily so that ``import paella`` (and the CLI's start-up) costs nothing it does not use.
"""
__version__ = '0.1.0'

_EXPORTS = {
    'Paella': 'model', 'PaellaConfig': 'model', 'add_noise': 'model', 'loss_weight': 'model',
    'VQModel': 'vq', 'VQConfig': 'vq',
    'sample': 'sampler',
    'CheckpointError': 'checkpoint', 'read_state_dict': 'checkpoint',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f'.{_EXPORTS[name]}', __name__), name)
    raise AttributeError(f"module 'paella' has no attribute {name!r}")
