"""A super-resolving VQGAN (`VQConfig.sr_levels`) against the 64 px decoder upscaled: reconstruction PSNR
of every render at the large size, edge sharpness, and decoding time.

    python benchmarks/sr_decoder.py --small runs/openmoji64 --large runs/openmoji256     # the shipped VQGAN

- ``sr``: each large render encoded by the super-resolving VQGAN (its encoder reads the render averaged
  down to 64 px) and decoded at the large size;
- ``bicubic``: each 64 px render encoded and decoded by ``--base``'s native path (default: the same VQGAN's,
  which is the 64 px decoder it grew from), the picture upscaled bicubically (Pillow) to the large size;
- PSNR against the large render (mean over all renders); sharpness: the picture's gradient energy (mean
  squared difference of neighbouring pixels, x and y) over the render's (1: as sharp as the drawing);
- decoding time per image at batch 8 (median of 7, after a warm-up), the native 64 px path and the large
  one, in the same run.
"""
import argparse
import json
import time

import numpy as np
import torch
from PIL import Image


def array(im):
    return np.asarray(im, dtype=np.float64) / 255


def gradient_energy(im):
    x = array(im)
    return float((np.diff(x, axis=0) ** 2).mean() + (np.diff(x, axis=1) ** 2).mean())


def pictures(vq, images, native, batch=64):
    """Encode and decode PIL images with ``vq`` (at its own or, ``native``, its 64 px size)."""
    out = []
    for lo in range(0, len(images), batch):
        x = torch.from_numpy(np.stack([array(im) for im in images[lo:lo + batch]])).float().permute(0, 3, 1, 2)
        with torch.no_grad():
            y = vq.decode_indices(vq.encode_indices(x, native=native), native=native).clamp(0, 1)
        out += [Image.fromarray(a) for a in (y.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)]
    return out


def ms_per_image(vq, native, batch=8, repeats=7):
    idx = torch.randint(0, vq.codebook_size, (batch, 16, 16), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            vq.decode_indices(idx, native=native)
            times.append(time.perf_counter() - t0)
    return float(np.median(times[1:])) / batch * 1000


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--vqgan', default=None, help="the super-resolving VQGAN (default: the shipped model's)")
    p.add_argument('--base', default=None, help="the 64 px VQGAN (default: --vqgan's native path)")
    p.add_argument('--small', required=True, help='renders at 64 px (paella data openmoji --size 64)')
    p.add_argument('--large', required=True, help='the same renders at the large size (e.g. --size 256)')
    p.add_argument('--n', type=int, default=None, help='only the first N renders')
    args = p.parse_args()
    from paella.images import psnr
    from paella.loading import default_model_path
    from paella.vq import VQModel
    from paella_openmoji.eval import load_real
    sr = VQModel.from_pretrained(args.vqgan or default_model_path() / 'vqgan', dtype=torch.float32).eval()
    base = VQModel.from_pretrained(args.base, dtype=torch.float32).eval() if args.base else sr
    small, large = load_real(args.small), load_real(args.large)
    names = sorted(small.keys() & large.keys())[:args.n]
    side = large[names[0]].size[0]
    up = [im.resize((side, side), Image.BICUBIC) for im in pictures(base, [small[k] for k in names], True)]
    mine = pictures(sr, [large[k] for k in names], False)
    truth = [large[k] for k in names]
    edges = [gradient_energy(t) for t in truth]
    row = {'renders': len(names), 'size': side,
           'psnr_sr': round(float(np.mean([psnr(a, b) for a, b in zip(mine, truth)])), 2),
           'psnr_bicubic': round(float(np.mean([psnr(a, b) for a, b in zip(up, truth)])), 2),
           'sharpness_sr': round(float(np.mean([gradient_energy(a) for a in mine]) / np.mean(edges)), 3),
           'sharpness_bicubic': round(float(np.mean([gradient_energy(a) for a in up]) / np.mean(edges)), 3),
           'ms_native_b8': round(ms_per_image(sr, True), 1), 'ms_large_b8': round(ms_per_image(sr, False), 1)}
    row['psnr_gain_db'] = round(row['psnr_sr'] - row['psnr_bicubic'], 2)
    row['added_ms_b8'] = round(row['ms_large_b8'] - row['ms_native_b8'], 1)
    print(json.dumps(row))


if __name__ == '__main__':
    main()
