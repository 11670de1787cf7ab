"""Data prepared once before training: `preencode` (an image folder through the frozen VQGAN, the text
encoder and CLIP, into one safetensors file) and `restored_pairs` (the generator's restored tokens with
the images they should show, to train a VQGAN decoder on)."""
import json
from pathlib import Path

import torch

from ..checkpoint import atomic_write
from ..data import ImageFolder, collate


def batches_of(folder, image_size, batch_size, skipped):
    """Collated batches of an image folder (centre crops), appending bad files to ``skipped``; skipped
    captions (not UTF-8) are kept, decoded as Latin-1."""
    ds = ImageFolder(folder, image_size, random_crop=False)
    for lo in range(0, len(ds), batch_size):
        batch, bad = collate([ds[i] for i in range(lo, min(lo + batch_size, len(ds)))])
        skipped += [b for b in bad if not b[1].startswith('caption')]
        if batch:
            yield batch


def write(out, tensors, meta):
    """One safetensors file (atomically), the metadata as JSON under 'paella'."""
    from safetensors.torch import save_file
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, p,
                                           metadata={'paella': json.dumps(meta)}))


@torch.no_grad()
def preencode(folder, out, vqgan, text_encoder=None, clip=None, image_size=64, batch_size=32, device=None):
    """Run the frozen VQGAN, text encoder and CLIP once over an image folder; write one safetensors file.

    Tensors (N rows each): ``tokens`` (N, h, w) int16, ``text`` (N, L, D) fp16 (zero padded),
    ``text_mask`` (N, L), and with CLIP ``clip_text`` / ``clip_image`` (N, D); plus ``_uncond_text`` and
    ``_uncond_clip`` for the empty prompt. Captions, file names and skipped files go in the metadata.
    Returns (number written, list of (name, reason) skipped).
    """
    from ..conditioning import collate as pad_states
    rows = {k: [] for k in ('tokens', 'text', 'clip_text', 'clip_image')}
    captions, names, skipped = [], [], []
    for batch in batches_of(folder, image_size, batch_size, skipped):
        images = batch['image'].to(device or 'cpu')
        rows['tokens'].append(vqgan.encode_indices(images).to(torch.int16).cpu())
        if text_encoder is not None:
            states, mask = text_encoder.encode(batch['caption'])
            rows['text'] += [s[m].half().cpu() for s, m in zip(states, mask)]
        if clip is not None:
            rows['clip_text'].append(clip.encode_text(batch['caption']).cpu())
            rows['clip_image'].append(clip.encode_images(images).cpu())
        captions += batch['caption']
        names += batch['name']
    if not names:
        raise ValueError(f"no usable images in {folder}")
    tensors = {'tokens': torch.cat(rows['tokens'])}
    if text_encoder is not None:
        padded = pad_states(rows['text'], text_encoder.pad_to)
        tensors.update(text=padded.states, text_mask=padded.mask)
        u = text_encoder.encode([''])
        tensors['_uncond_text'] = u.states[:, :padded.states.shape[1]].half().cpu()
    if clip is not None:
        tensors.update(clip_text=torch.cat(rows['clip_text']), clip_image=torch.cat(rows['clip_image']))
        tensors['_uncond_clip'] = clip.encode_text(['']).cpu()
    meta = {'captions': captions, 'names': names, 'skipped': skipped, 'image_size': image_size,
            'vqgan': getattr(vqgan, 'source', ''),
            'text_encoder': getattr(text_encoder, 'id', None)}
    write(out, tensors, meta)
    return len(names), skipped


def restored_pairs(folder, out, pipe, strength=1.0, copies=1, seed=0, batch_size=32):
    """Tokens the pipeline's generator restores, paired with the image they should show: data for training
    a VQGAN decoder to draw the real image from the generator's (imperfect) tokens (`paella train-vq` on
    the file). For every image of the folder, one row of its own tokens and ``copies`` rows of its tokens
    re-noised to ``strength`` and restored toward its caption (`Pipeline.edit`; strength 1 = generated
    from the caption alone). Tensors: ``tokens`` (N, h, w) int16, ``image`` (N, 3, H, W) uint8 and
    ``restored`` (N,) bool; skipped files go in the metadata. Returns (rows, list of (name, reason) skipped)."""
    from PIL import Image
    w, h = pipe.image_size
    if w != h:
        raise ValueError(f"restored_pairs needs a square canvas, the pipeline's is {w}x{h}")
    generator = torch.Generator(pipe.device).manual_seed(seed)
    tokens, images, restored, skipped = [], [], [], []
    for batch in batches_of(folder, w, batch_size, skipped):
        pixels = (batch['image'] * 255).round().to(torch.uint8)                     # (b, 3, H, W)
        pil = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
        rows = [pipe.encode_images(pil)] + [pipe.edit(pil, batch['caption'], strength, generator=generator,
                                                      output='tokens') for _ in range(copies)]
        for i, t in enumerate(rows):
            tokens.append(t.to(torch.int16).cpu())
            images.append(pixels)
            restored.append(torch.full((len(t),), i > 0))
    if not tokens:
        raise ValueError(f"no usable images in {folder}")
    tensors = {'tokens': torch.cat(tokens), 'image': torch.cat(images), 'restored': torch.cat(restored)}
    write(out, tensors, {'strength': strength, 'copies': copies, 'seed': seed, 'image_size': w, 'skipped': skipped})
    return len(tensors['tokens']), skipped
