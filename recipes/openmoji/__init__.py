"""The OpenMoji recipe: the emoji model's data set and evaluation, apart from the library.

Installed with the project as ``paella_openmoji``; the ``paella`` command calls it for
``paella data openmoji`` (`build_dataset`, `ATTRIBUTION`) and ``paella eval`` (`eval_lines`).
How the shipped emoji model was trained, stage by stage: ``recipes/openmoji/README.md``.
"""
from .dataset import ATTRIBUTION, build, build_dataset, catalogue, render
from .eval import (
    PARAPHRASES,
    REGIONAL_PAIRS,
    eval_lines,
    evaluate,
    load_real,
    regional_trials,
)

__all__ = ['ATTRIBUTION', 'PARAPHRASES', 'REGIONAL_PAIRS', 'build', 'build_dataset', 'catalogue', 'eval_lines',
           'evaluate', 'load_real', 'regional_trials', 'render']
