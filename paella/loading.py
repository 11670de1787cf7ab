"""Reading a pipeline's models: a pipeline folder, or the official v3 files; at once, or in low memory.

`pipeline_parts` and `v3_parts` return the keyword arguments of `Pipeline` (generator, vqgan, text_encoder,
clip, prior, settings, specs, cache). Low memory (`paella.offload`) holds one large model at a time: ByT5's
blocks read from disk at each forward, CLIP's towers and the prior loaded for each call and released after,
every encoder in the compute dtype, and the prompts' embeddings cached on disk so that ByT5-XL runs once
per prompt. It is the default where the models would fill most of the available RAM.
"""
import json
from pathlib import Path

import torch

from . import checks
from .cache import EmbeddingCache, default_cache_folder
from .captions import FOLDER as CAPTIONS, Captions
from .checkpoint import CONFIG_NAME, CheckpointError
from .model import Paella
from .offload import OnDemand, Weights, hub_folder, memory_is_short
from .prior import PriorModel
from .settings import PIPELINE_NAME, Settings, read_meta
from .speed import resolve_dtype
from .vq import VQModel


def default_model_path():
    """The folder of the default emoji model inside the installed package."""
    return Path(__file__).resolve().parent / 'weights' / 'openmoji'


def source(name_or_path):
    """A local folder as an absolute path (a saved pipeline may be used from anywhere); a hub name as is."""
    p = Path(name_or_path)
    return str(p.resolve()) if p.exists() else str(name_or_path)


def pipeline_parts(folder=None, device=None, dtype='auto', low_memory=None, cache=None):
    """`Pipeline` arguments from a pipeline folder (None: the shipped emoji model); see
    `Pipeline.from_pretrained`."""
    device = checks.device(device)
    dtype = resolve_dtype(dtype, device)
    folder = Path(folder) if folder is not None else default_model_path()
    if not (folder / PIPELINE_NAME).is_file() and folder == default_model_path():
        raise CheckpointError(f"the default emoji model is not installed (expected in {folder}); pass a pipeline folder")
    if not (folder / PIPELINE_NAME).is_file():
        raise CheckpointError(f"{folder} is not a pipeline folder: it has no {PIPELINE_NAME}")
    meta = read_meta(folder / PIPELINE_NAME)
    clip = meta['clip']['path'] if meta.get('clip') else None
    if low_memory is None:
        low_memory = memory_is_short(folder.glob('*/model.safetensors'), dtype, encoder_files(meta['text_encoder'], clip))

    # Weights may be stored in half precision to keep the package small; compute in `dtype`.
    def load(cls, sub, dt=dtype):
        return cls.from_pretrained(folder / sub, device=device, dtype=dt)
    prior = None
    if (folder / 'prior').is_dir():
        config = json.loads((folder / 'prior' / CONFIG_NAME).read_text())['config']
        prior = (lambda: load(PriorModel, 'prior'), PriorModel.config_from_dict(config))
    return dict(generator=load(Paella, 'generator'), vqgan=load(VQModel, 'vqgan', torch.float32),
                **conditioning(meta['text_encoder'], clip, prior, device, dtype, low_memory),
                settings=meta['settings'], specs={k: meta[k] for k in ('text_encoder', 'clip') if k in meta},
                cache=embedding_cache(cache, low_memory),
                captions=Captions.from_pretrained(folder) if (folder / CAPTIONS).is_dir() else None)


def v3_parts(paella, vqgan, prior, byt5, clip, device=None, dtype='auto', preset=None, low_memory=None, cache=None):
    """`Pipeline` arguments from the official v3 files and the ByT5 / CLIP models; see `Pipeline.v3`."""
    dtype = resolve_dtype(dtype, device)
    text = {'type': 'byt5', 'path': source(byt5)}
    if low_memory is None:
        low_memory = memory_is_short([paella, vqgan, prior], dtype, encoder_files(text, source(clip)))

    def load_prior():
        return PriorModel.from_pretrained(prior, preset=preset or 'v1', device=device, dtype=dtype)
    return dict(generator=Paella.from_pretrained(paella, preset=preset or 'v3', device=device, dtype=dtype),
                vqgan=VQModel.from_pretrained(vqgan, preset=preset or 'f4', device=device),
                **conditioning(text, source(clip), (load_prior, PriorModel.make_config(preset or 'v1')), device,
                               dtype, low_memory),
                settings=Settings.v3(), specs={'text_encoder': text, 'clip': {'path': source(clip)}},
                cache=embedding_cache(cache, low_memory))


def conditioning(text_spec, clip_path, prior, device, dtype, low_memory):
    """{text_encoder, clip, prior} of a pipeline; ``prior``: (load, config) or None. Low memory: ByT5
    streamed from disk, CLIP's towers and the prior `OnDemand`, all in ``dtype``; else the encoders in
    float32 and everything loaded now."""
    from .conditioning import clip_encoder, load_text_encoder
    enc_dtype = dtype if low_memory else None
    text = load_text_encoder(text_spec, device, dtype=enc_dtype, stream=low_memory)
    clip = clip_encoder(clip_path, device=device, dtype=enc_dtype, keep=not low_memory) if clip_path else None
    if prior is not None:
        load, config = prior
        prior = OnDemand(load, config=config) if low_memory else load()
    return dict(text_encoder=text, clip=clip, prior=prior)


def encoder_files(spec, clip_path):
    """The weights files of a pipeline's encoders (for the memory estimate): local folders, and Hugging Face
    names found in the local cache (one not downloaded yet counts as nothing)."""
    files = []
    for path in (spec.get('path'), clip_path):
        folder = path if path and Path(path).is_dir() else hub_folder(path, download=False) if path else None
        try:
            files += Weights.of(folder).files if folder else []
        except FileNotFoundError:
            pass
    return files


def embedding_cache(cache, low_memory):
    """The EmbeddingCache a pipeline uses: the one given, one over the folder given, the default folder's in
    low memory; None when ``cache`` is False, or None outside low memory."""
    if cache is False or (cache is None and not low_memory):
        return None
    return cache if isinstance(cache, EmbeddingCache) else EmbeddingCache(cache or default_cache_folder())
