"""Image-set measures in a feature space we own, for judging a model against real pictures.

Feature space ("pixel-16"): an image is resized to 16x16 by area averaging (Pillow's BOX filter), its
RGB values in [0, 1] flattened to 768 numbers. For centred drawings on white (the emoji model's data),
distance in this space compares layout and colour, ignoring the exact strokes; it needs no pretrained
network (none can be downloaded here).

- `features`: the pixel-16 features of a list of images;
- `retrieval`: top-1 / top-5 rate at which each generated image is nearest to its own real picture;
- `frechet`: the Frechet distance between two feature sets (after a joint PCA);
- `at_size`, `render_tokens`: pictures averaged down to a size; the tokens of real pictures, read at their own size;
- `reconstruction_psnr`: a VQGAN's encode-decode PSNR per image (the best a generator could do).

The emoji model's report built from them (`paella eval`) is the recipe's: `recipes/openmoji/eval.py`.
"""
import numpy as np
import torch
from PIL import Image

from .images import psnr


def features(images):
    """(N, 768) pixel-16 features of PIL images."""
    return torch.from_numpy(np.stack([
        np.asarray(im.convert('RGB').resize((16, 16), Image.BOX), dtype=np.float32).reshape(-1) / 255
        for im in images]))


def retrieval(generated, real, targets):
    """Top-1 / top-5 rate at which row i of generated is nearest (L2) to real[targets[i]]."""
    d = torch.cdist(generated, real)                                    # (N, M)
    rank = (d < d.gather(1, torch.tensor(targets)[:, None])).sum(1)    # how many are nearer than the target
    return (rank < 1).float().mean().item(), (rank < 5).float().mean().item()


def frechet(a, b, dims=64):
    """Frechet distance between two feature sets after a joint PCA to ``dims`` dimensions."""
    x = torch.cat([a, b]).double()
    mean = x.mean(0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    pa, pb = (a.double() - mean) @ v[:dims].T, (b.double() - mean) @ v[:dims].T
    ma, mb = pa.mean(0), pb.mean(0)
    ca, cb = torch.cov(pa.T), torch.cov(pb.T)
    ev = torch.linalg.eigvals(ca @ cb).real.clamp(min=0)
    return float(((ma - mb) ** 2).sum() + ca.trace() + cb.trace() - 2 * ev.sqrt().sum())


def at_size(images, size):
    """The images averaged down (box filter) to ``size`` (W, H) where they differ: a super-resolving
    decoder's pictures measured at the size of real pictures."""
    return [im.resize(size, Image.BOX) if im.size != tuple(size) else im for im in images]


def render_tokens(pipe, images):
    """Token grids (B, h, w) of same-size images read at their own size: through a super-resolving VQGAN's
    native path where they are smaller than the pipeline's canvas (the 64 px renders of the 256 px emoji
    pipeline: the tokens its generator learnt from), else as `Pipeline.encode_images` reads them."""
    size = images[0].size
    return pipe.encode_images(images, size, native=pipe.native or size != pipe.image_size)


def reconstruction_psnr(pipe, images, batch=64):
    """PSNR of each image against its reconstruction by the pipeline's VQGAN (encode, then decode; pictures
    drawn larger than the images are averaged down to their size, as `paella eval` measures generated ones)."""
    out = []
    for lo in range(0, len(images), batch):
        chunk = images[lo:lo + batch]
        pictures = at_size(pipe.decode(render_tokens(pipe, chunk)), chunk[0].size)
        out += [psnr(r, x) for r, x in zip(pictures, chunk)]
    return out
