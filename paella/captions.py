"""A retrieval prior: any prompt -> one of the captions the generator was trained on.

A small model trained on a few thousand captions (the emoji model: Unicode names and short names) draws
those captions cleanly and falls apart a step away from them: an unseen sentence gives text states the
generator never saw, and it answers with stray tokens. Paella v3 bridges text and what its generator knows
with a learned prior (CLIP text -> CLIP image); `Captions` is the same bridge read off the training set
instead of trained. Every training caption (a *key*) is embedded once with the pipeline's own text encoder
(the mean of its token states, at unit length) and points to its image's first caption (its *target*: the
emoji's name). A prompt is replaced by a target drawn from softmax(similarity / temperature), where a
target's similarity is a soft maximum over its keys. A generic prompt ("a cat") has several near ties and
gets a different known cat on different seeds; a specific one ("a shiny red apple") has one clear winner.
A prompt that already is a training caption is kept as typed, so it gets the very image it got without
the prior. Words the text encoder does not know whole and no caption has ('bananna') are also tried
spelled as the nearest caption word.

A pipeline folder holds it in ``captions/``: ``captions.json`` (the key and target texts, the encoder's
id) and ``captions.safetensors`` (the keys' embeddings (K, D) in float16, each key's target (K,)).
"""
import difflib
import json
import re
import shutil
from pathlib import Path

import torch

from .checkpoint import CheckpointError, atomic_write
from .model import text_pool

FOLDER, META, TENSORS = 'captions', 'captions.json', 'captions.safetensors'
KEY_SOFTNESS = 0.02     # a target's similarity: softness * log sum exp(key similarity / softness) over its keys
SPELLING = 0.8          # difflib ratio above which an unknown word is read as a caption word (elefant: elephant)


def normal(text):
    """A caption as it is compared for "already known": lower case, single spaces."""
    return re.sub(r'\s+', ' ', text.strip().lower())


@torch.no_grad()
def embed(encoder, texts, batch=256):
    """(N, D) unit sentence embeddings: `text_pool` of each text's token states, what the generator's
    pooled-text input is and what sentence-transformers computes for MiniLM."""
    return torch.cat([text_pool(encoder.encode(list(texts[lo:lo + batch])).states).float().cpu()
                      for lo in range(0, len(texts), batch)])


def folder_pairs(folder):
    """(key, target) pairs of a training folder (`paella.data.ImageFolder`): every caption of an image,
    each pointing to the image's first non-empty caption (`paella data` writes the name first, the aliases
    after)."""
    from .data import ImageFolder
    data = ImageFolder(folder)
    captions = [(path, data.caption(i)[0]) for i, path in enumerate(data.files)]      # as training reads them
    first = {}
    for path, caption in captions:
        if caption:
            first.setdefault(path, caption)
    return [(c, first[p]) for p, c in captions if c]


def save_captions(captions, folder):
    """Write a pipeline folder's ``captions/`` (`Captions.save_pretrained`); with ``captions`` None, remove
    one an earlier save left there, so that a pipeline saved without a prior has none."""
    if captions is not None:
        captions.save_pretrained(folder)
    elif (Path(folder) / FOLDER).is_dir():
        shutil.rmtree(Path(folder) / FOLDER)


class Captions:
    """The training captions of a generator, embedded: ``keys`` (K, D) unit vectors of the key texts,
    ``target`` (K,) the index in ``targets`` (the captions a prompt is drawn as) of each key."""

    def __init__(self, key_texts, targets, keys, target, encoder_id):
        k = len(key_texts)
        if keys.dim() != 2 or keys.shape[0] != k or tuple(target.shape) != (k,):
            raise ValueError(f"{k} keys need ({k}, D) embeddings and ({k},) targets, got {tuple(keys.shape)} "
                             f"and {tuple(target.shape)}")
        if k == 0 or not 0 <= int(target.min()) <= int(target.max()) < len(targets):
            raise ValueError(f"key targets must index the {len(targets)} target captions")
        self.key_texts, self.targets, self.encoder_id = list(key_texts), list(targets), encoder_id
        self.keys, self.target = keys.float(), target.long()
        self.known = {normal(t) for t in self.key_texts + self.targets}
        self.words = frozenset(w for t in self.known for w in re.findall(r'[a-z]+', t))
        self.vocabulary = None          # the encoder's whole-word tokens, read at the first respelling

    @classmethod
    def build(cls, encoder, pairs):
        """From (key, target) pairs (`folder_pairs`); the keys are embedded with ``encoder``, the pipeline's
        text encoder."""
        pairs = list(dict.fromkeys(pairs))
        if not pairs:
            raise ValueError("no captions to build the retrieval prior from")
        targets = list(dict.fromkeys(t for _, t in pairs))
        index = {t: i for i, t in enumerate(targets)}
        return cls([k for k, _ in pairs], targets, embed(encoder, [k for k, _ in pairs]),
                   torch.tensor([index[t] for _, t in pairs]), encoder.id)

    def respelled(self, prompt, vocabulary):
        """The prompt with each word that is neither a whole token of the encoder's ``vocabulary`` nor a
        caption word replaced by the closest caption word, where one is close enough ('piza' -> 'pizza')."""
        def fix(m):
            word = m.group(0).lower()
            if word in vocabulary or word in self.words:
                return m.group(0)
            close = difflib.get_close_matches(word, self.words, n=1, cutoff=SPELLING)
            return close[0] if close else m.group(0)
        return re.sub(r'[A-Za-z]+', fix, prompt)

    def similarity(self, encoder, prompts, soft=True, respell=True):
        """(B, T) similarity of each prompt to each target: a soft maximum (``soft=False``: the maximum) over
        the target's keys of the cosine similarity, the better of the prompt as typed and respelled."""
        s = embed(encoder, prompts) @ self.keys.T                                       # (B, K)
        tokenizer = getattr(encoder, 'tokenizer', None)
        if respell and tokenizer is not None:
            self.vocabulary = self.vocabulary or frozenset(tokenizer.get_vocab())
            respelled = {i: r for i, p in enumerate(prompts) if (r := self.respelled(p, self.vocabulary)) != p}
            if respelled:
                rows = list(respelled)
                s[rows] = torch.maximum(s[rows], embed(encoder, list(respelled.values())) @ self.keys.T)
        if not soft:
            out = torch.full((len(prompts), len(self.targets)), -2.0)
            return out.scatter_reduce(1, self.target.expand(len(prompts), -1), s, 'amax')
        e = torch.exp((s - 1) / KEY_SOFTNESS)                   # s <= 1: no overflow
        summed = torch.zeros(len(prompts), len(self.targets)).index_add_(1, self.target, e)        # (B, T)
        return 1 + KEY_SOFTNESS * torch.log(summed.clamp(min=1e-30))

    def check_encoder(self, encoder):
        """ValueError unless ``encoder`` is the one the keys were embedded with."""
        if encoder.id != self.encoder_id:
            raise ValueError(f"the captions were embedded with {self.encoder_id!r}, the pipeline encodes with "
                             f"{encoder.id!r}: build them again with this encoder (paella captions)")

    def choose(self, encoder, prompts, temperature, generator=None):
        """The caption each prompt is drawn as: the prompt itself where it is a training caption, else a
        target drawn from softmax(similarity / temperature) (temperature 0: the nearest) with ``generator``.

        The draw uses a copy of the generator, which is left where it was: the sampler then draws the
        same initial tokens as without the prior, so a prompt kept as typed gives the same image."""
        self.check_encoder(encoder)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        rows = [i for i, p in enumerate(prompts) if p.strip() and normal(p) not in self.known]
        if not rows:
            return list(prompts)
        asked = {p: k for k, p in enumerate(dict.fromkeys(prompts[i] for i in rows))}   # each prompt once
        s = self.similarity(encoder, list(asked))[[asked[prompts[i]] for i in rows]]        # (b, T)
        if temperature == 0:
            picks = s.argmax(1)
        else:
            device = generator.device if generator is not None else torch.device('cpu')
            copy = torch.Generator(device)
            if generator is not None:
                copy.set_state(generator.get_state())
            else:
                copy.seed()
            u = torch.rand(len(prompts), generator=copy, device=device).cpu()[rows]   # (b,): one per row
            cdf = torch.softmax(s / temperature, 1).cumsum(1)                           # (b, T)
            picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=len(self.targets) - 1)[:, 0]
        out = list(prompts)
        for i, j in zip(rows, picks.tolist()):
            out[i] = self.targets[j]
        return out

    def save_pretrained(self, folder):
        """Write ``folder/captions/`` (see the module's docstring)."""
        from safetensors.torch import save_file
        folder = Path(folder) / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {'keys': self.keys.half().contiguous(), 'target': self.target.int().contiguous()}
        atomic_write(folder / TENSORS, lambda p: save_file(tensors, str(p)))
        meta = {'encoder': self.encoder_id, 'targets': self.targets, 'keys': self.key_texts}
        atomic_write(folder / META, lambda p: Path(p).write_text(json.dumps(meta, ensure_ascii=False) + '\n',
                                                                 encoding='utf-8'))
        return folder

    @classmethod
    def from_pretrained(cls, folder):
        """Read ``folder/captions/`` of a pipeline folder; CheckpointError naming it when it is damaged."""
        from safetensors.torch import load_file
        folder = Path(folder) / FOLDER
        try:
            meta = json.loads((folder / META).read_text(encoding='utf-8'))
            tensors = load_file(str(folder / TENSORS))
            return cls(meta['keys'], meta['targets'], tensors['keys'], tensors['target'], meta['encoder'])
        except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for damaged files)
            raise CheckpointError(f"{folder} is not a captions folder ({META} + {TENSORS}): {e}") from None
