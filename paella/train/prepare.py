"""Data prepared once before training: `preencode` (an image folder through the frozen VQGAN, the text
encoder and CLIP, into one safetensors file), `preencode_shards` (webdataset shards into shards of the
same, on N processes, resumable) and `restored_pairs` (the generator's restored tokens with
the images they should show, to train a VQGAN decoder on)."""
import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
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
    from ..cache import collate as pad_states
    rows = {k: [] for k in ('tokens', 'text', 'clip_text', 'clip_image')}
    captions, names, skipped = [], [], []
    for batch in batches_of(folder, image_size, batch_size, skipped):
        images = batch['image'].to(device or 'cpu')
        rows['tokens'].append(vqgan.encode_indices(images, native=True).to(torch.int16).cpu())   # 4 px a token
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


def npy(tensor):
    """A tensor as .npy bytes (a webdataset member)."""
    buf = io.BytesIO()
    np.save(buf, tensor.numpy(), allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def encode_batch(raws, samples, vqgan, text_encoder, clip, device):
    """Output members of a batch: tokens.npy (h, w) int16, text.npy (L, D) fp16 (padded to the encoder's
    pad_to, as in a preencode file; else unpadded) with text_mask.npy (L,), clip_text.npy / clip_image.npy
    (D,), the caption and the input's json."""
    images = torch.stack([s['image'] for s in samples]).to(device or 'cpu')       # (b, 3, S, S)
    captions = [s['caption'] for s in samples]
    cols = {'tokens.npy': vqgan.encode_indices(images, native=True).to(torch.int16).cpu()}    # 4 px a token
    if text_encoder is not None:
        states, mask = text_encoder.encode(captions)                                 # (b, L, D), (b, L)
        rows = [slice(None) if text_encoder.pad_to else m for m in mask]           # padded, or the tokens
        cols['text.npy'] = [s[r].half().cpu() for s, r in zip(states, rows)]
        cols['text_mask.npy'] = [m[r].cpu() for m, r in zip(mask, rows)]
    if clip is not None:
        cols['clip_text.npy'], cols['clip_image.npy'] = clip.encode_text(captions).cpu(), clip.encode_images(images).cpu()
    out = []
    for i, raw in enumerate(raws):
        sample = {'__key__': raw['__key__'], **{k: npy(v[i]) for k, v in cols.items()},
                  'txt': captions[i].encode('utf-8')}
        out.append({**sample, 'json': raw['json']} if 'json' in raw else sample)
    return out


def encode_shard(raws, vqgan, text_encoder, clip, image_size, batch_size, device, skipped):
    """The output samples of one input shard's raw samples, batch by batch (a shard never waits whole in
    memory); the (name, reason) of the samples skipped are appended to ``skipped``."""
    from ..data import decode_shard_sample, select_shard_sample, webdataset_filter
    check, pending = webdataset_filter(), []
    for raw in raws:
        raw = select_shard_sample(raw, check, captions=text_encoder is not None or clip is not None)
        sample = raw if 'skip' in raw else decode_shard_sample(raw, None, image_size)
        if 'skip' in sample:
            skipped.append((sample['name'], sample['skip']))
            continue
        pending.append((raw, sample))
        if len(pending) == batch_size:
            yield from encode_batch(*zip(*pending), vqgan, text_encoder, clip, device)
            pending.clear()
    if pending:
        yield from encode_batch(*zip(*pending), vqgan, text_encoder, clip, device)


def preencode_shards(urls, out, vqgan, text_encoder=None, clip=None, image_size=64, batch_size=32, device=None,
                     rank=0, world=1, log=print):
    """`preencode` for webdataset shards: input shard i becomes ``out/{i:05d}.tar`` (members as
    `encode_batch`), written by process ``rank`` of ``world`` when i % world == rank; an output shard that
    exists is finished (each is written atomically), so a rerun after a kill does the rest. Rank 0 writes
    ``out/extras.safetensors`` (the empty prompt's states, the settings). Train on ``out/{00000..N-1}.tar``.
    Returns (shards written, samples written, list of (name, reason) skipped)."""
    from ..shards import EXTRAS, expand, preencoded_extras, read_shard, write_shard
    inputs, out = expand(urls), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {'shards': '{%05d..%05d}.tar' % (0, len(inputs) - 1), 'inputs': inputs, 'image_size': image_size,
            'vqgan': getattr(vqgan, 'source', ''), 'text_encoder': getattr(text_encoder, 'id', None),
            'clip': clip is not None}
    if (out / EXTRAS).is_file():
        old = preencoded_extras(str(out / '00000.tar'))[1]
        if {k: old.get(k) for k in meta} != meta:
            raise ValueError(f"{out} holds shards pre-encoded from other inputs or settings: use another folder")
    elif rank == 0:
        for stale in out.glob(f'.{EXTRAS}.*.tmp'):
            stale.unlink()
        extras = {}
        if text_encoder is not None:
            extras['_uncond_text'] = text_encoder.encode(['']).states.half().cpu()
        if clip is not None:
            extras['_uncond_clip'] = clip.encode_text(['']).cpu()
        write(out / EXTRAS, extras, meta)
    written, samples, skipped = 0, 0, []
    for i in range(rank, len(inputs), world):
        path = out / f'{i:05d}.tar'
        for stale in out.glob(f'.{path.name}.*.tmp'):        # a write a kill interrupted
            stale.unlink()
        if path.exists():
            continue
        raws = read_shard(inputs[i])
        try:
            first = next(raws, None)                           # opens the input
        except (OSError, tarfile.TarError) as e:             # no output: a rerun tries it again
            skipped.append((inputs[i], f"shard unreadable ({getattr(e, 'strerror', None) or e})"))
            continue
        bad = []
        done = write_shard(path, encode_shard(itertools.chain([first] if first else [], raws), vqgan, text_encoder,
                                              clip, image_size, batch_size, device, bad))
        written, samples, skipped = written + 1, samples + done, skipped + bad
        log(f"wrote {path} ({done} samples from {inputs[i]}, {len(bad)} skipped)")
    return written, samples, skipped


def restored_pairs(folder, out, pipe, strength=1.0, copies=1, seed=0, batch_size=32, image_size=None):
    """Tokens the pipeline's generator restores, paired with the image they should show: data for training
    a VQGAN decoder to draw the real image from the generator's (imperfect) tokens (`paella train-vq` on
    the file). For every image of the folder, one row of its own tokens and ``copies`` rows of its tokens
    re-noised to ``strength`` and restored toward its caption (`Pipeline.edit`; strength 1 = generated
    from the caption alone). Tensors: ``tokens`` (N, h, w) int16, ``image`` (N, 3, H, W) uint8 and
    ``restored`` (N,) bool; skipped files go in the metadata. Returns (rows, list of (name, reason) skipped).
    image_size: the stored images' side (default: the pipeline's canvas); a larger one pairs the tokens of
    the image averaged down to the canvas with the large image: data for a super-resolving decoder."""
    from PIL import Image
    w, h = pipe.image_size
    if w != h:
        raise ValueError(f"restored_pairs needs a square canvas, the pipeline's is {w}x{h}")
    size = image_size or w
    if size % w:
        raise ValueError(f"image_size must be a multiple of the pipeline's canvas ({w} px), got {size}")
    generator = torch.Generator(pipe.device).manual_seed(seed)
    tokens, images, restored, skipped = [], [], [], []
    for batch in batches_of(folder, size, batch_size, skipped):
        pixels = (batch['image'] * 255).round().to(torch.uint8)                     # (b, 3, size, size)
        # the box filter averages whole pixel blocks: what a super-resolving VQGAN's encoder reads
        pil = [Image.fromarray(p.permute(1, 2, 0).numpy()).resize((w, h), Image.BOX) for p in pixels]
        rows = [pipe.encode_images(pil)] + [pipe.edit(pil, batch['caption'], strength, generator=generator,
                                                      output='tokens') for _ in range(copies)]
        for i, t in enumerate(rows):
            tokens.append(t.to(torch.int16).cpu())
            images.append(pixels)
            restored.append(torch.full((len(t),), i > 0))
    if not tokens:
        raise ValueError(f"no usable images in {folder}")
    tensors = {'tokens': torch.cat(tokens), 'image': torch.cat(images), 'restored': torch.cat(restored)}
    write(out, tensors, {'strength': strength, 'copies': copies, 'seed': seed, 'image_size': size, 'skipped': skipped})
    return len(tensors['tokens']), skipped


def crop_pairs(tokens, images, size, s):
    """A random square of ``size`` tokens a side of each pair (b, h, w), and the pixels it covers in its image
    (b, 3, H, W); the corners are the step's draws ``s`` (per row, as every random draw of the trainer)."""
    b, h, w = tokens.shape
    if size > min(h, w):
        raise ValueError(f"--crop {size} is larger than the {h}x{w} token grids")
    f = images.shape[-1] // w                                                   # pixels per token
    rows, cols = s.randint(h - size + 1).tolist(), s.randint(w - size + 1).tolist()   # (b,) each
    return (torch.stack([t[i:i + size, j:j + size] for t, i, j in zip(tokens, rows, cols)]),
            torch.stack([im[:, i * f:(i + size) * f, j * f:(j + size) * f] for im, i, j in zip(images, rows, cols)]))
