"""The OpenMoji recipe: the emoji model's data set and evaluation, apart from the library.

Installed with the project as ``paella_openmoji``; the ``paella`` command calls it for
``paella data openmoji`` (`build_dataset`, `ATTRIBUTION`) and ``paella eval`` (`eval_lines`), and for the
LoRA style example: ``paella data twemoji`` (`build_style_set`) and ``paella eval --style twemoji``
(`style_report`); and for the LoRA concept example: ``paella data icon`` (`build_concept_set`).
How the shipped emoji model was trained, stage by stage: ``recipes/openmoji/README.md``.
"""
from .concepts import FONTAWESOME_ATTRIBUTION, build_concept_set, icon_svg
from .dataset import ATTRIBUTION, build, build_dataset, catalogue, render
from .eval import (
    PARAPHRASES,
    REGIONAL_PAIRS,
    eval_lines,
    evaluate,
    load_real,
    regional_trials,
)
from .styles import (
    HELD_OUT,
    STYLES,
    TWEMOJI_ATTRIBUTION,
    build_style_set,
    held_out,
    style_concepts,
    style_report,
    training_order,
    twemoji_svgs,
)

__all__ = ['ATTRIBUTION', 'FONTAWESOME_ATTRIBUTION', 'HELD_OUT', 'PARAPHRASES', 'REGIONAL_PAIRS', 'STYLES',
           'TWEMOJI_ATTRIBUTION', 'build', 'build_concept_set', 'build_dataset', 'build_style_set', 'catalogue',
           'eval_lines', 'evaluate', 'held_out', 'icon_svg', 'load_real', 'regional_trials', 'render',
           'style_concepts', 'style_report', 'training_order', 'twemoji_svgs']
