"""Tiny randomly initialised transformers models (ByT5 / CLIP) saved as local folders, built offline."""
import json

import torch


def byte_vocab():
    """The 256 byte symbols of GPT-2/CLIP byte-level BPE, in their standard order."""
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def save_t5(folder, d_model=24, seed=0, bin=False, **config):
    """A T5 encoder (ByT5's vocabulary) saved like from_pretrained reads it; ``config``: T5Config fields over the
    tiny ones; ``bin``: as pytorch_model.bin (the format of google/byt5-xl's files) instead of safetensors."""
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    cfg = T5Config(**{**dict(vocab_size=384, d_model=d_model, d_kv=8, d_ff=48, num_layers=2, num_heads=3,
                             relative_attention_num_buckets=8, decoder_start_token_id=0), **config})
    model = T5EncoderModel(cfg)
    if bin:
        folder.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(folder)
        torch.save(model.state_dict(), folder / 'pytorch_model.bin')
    else:
        model.save_pretrained(folder)
    return folder


def save_clip(folder, projection_dim=16, seed=0, empty_vocab=False, text=None, vision=None):
    """A CLIP model with a byte-level BPE vocabulary (no merges); ``text`` / ``vision``: config fields over the
    tiny towers'."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    symbols = [] if empty_vocab else byte_vocab()
    vocab = {s: i for i, s in enumerate(symbols + [s + '</w>' for s in symbols])}
    vocab['<|startoftext|>'] = len(vocab)
    vocab['<|endoftext|>'] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'vocab.json').write_text(json.dumps(vocab))
    (folder / 'merges.txt').write_text('#version: 0.2\n')
    CLIPTokenizer(str(folder / 'vocab.json'), str(folder / 'merges.txt')).save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={**dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=vocab['<|startoftext|>'], eos_token_id=vocab['<|endoftext|>'],
                            pad_token_id=vocab['<|endoftext|>']), **(text or {})},
        vision_config={**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8), **(vision or {})},
        projection_dim=projection_dim)
    CLIPModel(cfg).save_pretrained(folder)
    return folder
