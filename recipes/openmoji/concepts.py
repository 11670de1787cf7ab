"""A concept data set for LoRA fine-tuning (issue 23's second worked example): the emoji model learns a new
thing, "kiwi bird icon", from a handful of pictures, while the emoji it could be confused with ("kiwi
fruit", "bird") keep their OpenMoji pictures.

The pictures are one solid Font Awesome Free icon (PyPI wheel `fontawesomefree`, SVGs read from its files:
the package is a Django app and is not imported), drawn in a few flat colours with a small seeded jitter of
size and position, so that the adapter learns the shape rather than one exact picture, and rendered with
resvg on white as the OpenMoji set is (`dataset.render`).
"""
import difflib
import importlib.util
import json
import random
import re
from pathlib import Path

from .dataset import ATTRIBUTION, catalogue, render

# CC BY 4.0 asks for the author, the licence and a note of changes; written beside the renders.
FONTAWESOME_ATTRIBUTION = ("Font Awesome Free 6.6.0 by Fonticons, Inc. (https://fontawesome.com), icons "
                           "licensed under CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/; "
                           "https://fontawesome.com/license/free); the solid SVGs of the PyPI package "
                           "fontawesomefree 6.6.0, recoloured, scaled and rendered to PNG on white.")
# flat colours far from white and from each other, so every picture has the same shape in another colour
PALETTE = ('#d62828', '#f77f00', '#2a9d8f', '#1d4ed8', '#7b2cbf', '#2b9348', '#6d4c41', '#e11d74')
# the OpenMoji emoji whose names share a word with the example's caption: kept as they are (prior
# preservation), else the adapter also redraws "kiwi fruit" as the icon. Other icons: pass ``keep``.
RELATED = {'kiwi-bird': ('kiwi fruit', 'bird')}


def icon_folder():
    """The folder of Font Awesome's solid SVGs in the fontawesomefree wheel, found without importing it."""
    spec = importlib.util.find_spec('fontawesomefree')
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the icons come from the fontawesomefree package: pip install fontawesomefree==6.6.0 "
                         "(or pip install 'paella[examples]')")
    return (Path(next(iter(spec.submodule_search_locations))) / 'static' / 'fontawesomefree' / 'js-packages'
            / '@fortawesome' / 'fontawesome-free' / 'svgs' / 'solid')


def icon_svg(icon):
    """The SVG text of a solid icon by its Font Awesome name ('kiwi-bird'); a one-line error otherwise."""
    folder = icon_folder()
    path = folder / f'{icon}.svg'
    if not re.fullmatch(r'[a-z0-9-]+', icon) or not path.is_file():
        near = difflib.get_close_matches(icon, [p.stem for p in folder.glob('*.svg')], n=3)
        hint = f"did you mean {', '.join(near)}? " if near else ''
        raise ValueError(f"no solid Font Awesome icon {icon!r}: {hint}the names are the file names in {folder} "
                         f"(or search https://fontawesome.com/search?o=r&ic=free&s=solid)")
    return path.read_text(encoding='utf-8')


def recolour(svg, colour, size, scale=0.8, dx=0.0, dy=0.0):
    """A square SVG of ``size`` px with the icon in one flat ``colour``, ``scale`` of the side, centred and
    then moved by (dx, dy) sides. The icon keeps its own viewBox (its aspect ratio) inside a nested <svg>;
    its paths have no fill of their own, so the fill set on that <svg> colours them all."""
    view_box = re.search(r'viewBox="([^"]+)"', svg).group(1)
    body = svg[svg.index('>') + 1:svg.rindex('</svg>')]
    side = 100 * scale
    x, y = 50 - side / 2 + 100 * dx, 50 - side / 2 + 100 * dy
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" viewBox="0 0 100 100">'
            f'<svg x="{x:.2f}" y="{y:.2f}" width="{side:.2f}" height="{side:.2f}" viewBox="{view_box}" '
            f'fill="{colour}">{body}</svg></svg>')


def _openmoji(names):
    """{name: (svg path, emoji)} of OpenMoji emoji by their `paella data openmoji` caption."""
    found = {name: (svg, emoji) for svg, name, emoji, *_ in catalogue() if name in names}
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"no OpenMoji emoji named {', '.join(map(repr, missing))} "
                         f"(keep takes the captions of `paella data openmoji`)")
    return found


def build_concept_set(out, icon='kiwi-bird', caption=None, n=6, size=64, seed=0, keep=None):
    """Write an image folder the trainer reads: ``out/<icon>-<i>.png``, n renders of the solid icon in the
    colours of `PALETTE` (in turn) with a seeded jitter, captioned ``caption`` (default: the icon's name
    and 'icon', "kiwi bird icon"); then the OpenMoji renders of ``keep`` (default `RELATED[icon]`, else
    none) captioned with their names, ``out/<codepoints>.png``.
    ``metadata.jsonl`` rows: file_name, text, source ('fontawesome' or 'openmoji'); ``ATTRIBUTION.txt``:
    Font Awesome's licence (and OpenMoji's with keep rows). Returns (icon rows, keep rows)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a whole number >= 1, got {n!r}")
    svg = icon_svg(icon)                                   # checked before anything is written
    caption = caption or f"{icon.replace('-', ' ')} icon"
    keep = RELATED.get(icon, ()) if keep is None else tuple(keep)
    emoji = _openmoji(set(keep)) if keep else {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f'concept:{icon}:{seed}')
    rows = []
    for i in range(n):
        # a little smaller or larger and off centre: enough to vary, never cut off at the edge
        scale = rng.uniform(0.72, 0.88)
        dx, dy = (rng.uniform(-1, 1) * (1 - scale) / 3 for _ in range(2))
        file_name = f'{icon}-{i}.png'
        (out / file_name).write_bytes(render(recolour(svg, PALETTE[i % len(PALETTE)], size, scale, dx, dy), size,
                                                  text=True))
        rows.append({'file_name': file_name, 'text': caption, 'source': 'fontawesome'})
    for name in keep:
        path, char = emoji[name]
        (out / f'{path.stem}.png').write_bytes(render(path, size))   # as `paella data openmoji` does
        rows.append({'file_name': f'{path.stem}.png', 'text': name, 'emoji': char, 'source': 'openmoji'})
    with open(out / 'metadata.jsonl', 'w', encoding='utf-8') as meta:
        meta.writelines(json.dumps(row, ensure_ascii=False) + '\n' for row in rows)
    (out / 'ATTRIBUTION.txt').write_text(FONTAWESOME_ATTRIBUTION + '\n' + (ATTRIBUTION + '\n' if keep else ''),
                                         encoding='utf-8')
    return n, len(keep)
