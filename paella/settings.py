"""A pipeline's sampling `Settings` and its ``pipeline.json``: the encoders to load and the settings, checked
when read (a hand-edited file with a typo is one line naming the file and the key, not a traceback)."""
import json
from dataclasses import dataclass
from pathlib import Path

from . import checks
from .checkpoint import CheckpointError

PIPELINE_NAME = 'pipeline.json'


@dataclass
class Settings:
    """Sampling settings of a pipeline. The defaults are neutral, for a freshly trained model without CLIP
    or prior: guidance at every step and no attention reweighting. `Settings.v3()`: the published demo's."""
    latent_size: tuple = (16, 16)                   # token grid (H, W): 64 px with an f4 VQGAN, as trained
                                                    # (256 px through the emoji model's super-resolving one)
    steps: int = 12                                 # the shipped emoji model's count
    renoise_steps: int | None = None                # None: every step but the last re-noises (the sampler's)
    temperature: tuple = (1.0, 0.2)                 # linear from start to end (the sampler's default)
    cfg: float | tuple | None = 3.0                 # the shipped model's starting scale, held constant
    sampling_conditional_steps: int | None = None   # guidance for the first N steps only; None: all
    sampling_quant_steps: int | None = None         # 'quant' draws from step N on (the v3 demo's switch)
    mode: str = 'cdf'                               # the published step is 'multinomial' (paella.speed)
    renoise_rule: str = 'random'                    # which positions are re-noised (paella.renoise); published
    batch_cfg: bool = True                          # one forward for both CFG branches
    cache: bool = True                              # conditioning keys/values computed once per run
    attn_text_weight: float | None = None           # attention reweighting when an image embedding is used
    attn_image_weight: float | None = None
    prior_steps: int = 60
    prior_cfg: float | None = 3.0
    prior_sampler: str = 'ddpm'
    caption_temperature: float | None = None        # a pipeline with `captions`: None: prompts as typed (paella.captions)

    @classmethod
    def v3(cls):
        """The published Paella v3 demo's settings."""
        return cls(latent_size=(64, 64), steps=32, renoise_steps=26, temperature=(1.2, 0.2), cfg=8.0,
                   sampling_conditional_steps=20, mode='cdf', batch_cfg=True, cache=True, attn_text_weight=1.2,
                   attn_image_weight=0.4, prior_steps=60, prior_cfg=3.0, prior_sampler='ddpm')


def tuples(values):
    """Settings values as JSON stores them (lists) back to tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def read_meta(path):
    """A pipeline.json, checked: its encoders' specs and `Settings` (CheckpointError naming the file)."""
    try:
        meta = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get('settings'), dict) or 'text_encoder' not in meta:
        raise CheckpointError(f"{path} must hold a JSON object with 'settings' and 'text_encoder' (the "
                              f"encoder's spec, e.g. {{\"type\": \"minilm\"}})")
    unknown = sorted(set(meta) - {'settings', 'text_encoder', 'clip'})
    if unknown:
        raise CheckpointError(f"{path} holds unknown key(s) {unknown}; known: settings, text_encoder, clip")
    try:
        checks.overrides(meta['settings'], Settings)
        # kinds and ranges only: a call checks the settings against its pipeline's own caps
        loose = checks.Caps(steps=10 ** 6, side=10 ** 6)
        meta['settings'] = checks.settings(Settings(**tuples(meta['settings'])), loose)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    clip, text = meta.get('clip'), meta['text_encoder']
    if clip is not None and not (isinstance(clip, dict) and isinstance(clip.get('path'), str)):
        raise CheckpointError(f"{path}: 'clip' must be an object with a 'path'")
    if not (isinstance(text, dict) and isinstance(text.get('type'), str)):
        raise CheckpointError(f"{path}: 'text_encoder' must be an object with a 'type' ('minilm' or 'byt5')")
    return meta
