"""The LoRA concept example's data (recipes/openmoji/concepts.py, `paella data icon`): a Font Awesome icon
rendered in a few colours under one caption, beside the related emoji's OpenMoji rows under their names."""
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip('fontawesomefree', reason='the icons come from paella[examples] (fontawesomefree)')

from paella_openmoji import build_concept_set  # noqa: E402

from paella.cli import main  # noqa: E402


def rows(folder):
    return [json.loads(line) for line in (folder / 'metadata.jsonl').read_text(encoding='utf-8').splitlines()]


@pytest.fixture(scope='module')
def kiwi(tmp_path_factory):
    folder = tmp_path_factory.mktemp('kiwi')
    assert build_concept_set(folder) == (6, 2)
    return folder


def test_icon_rows_then_the_related_emoji_under_their_names(kiwi):
    r = rows(kiwi)
    assert [x['text'] for x in r] == ['kiwi bird icon'] * 6 + ['kiwi fruit', 'bird']
    assert [x['file_name'] for x in r] == [f'kiwi-bird-{i}.png' for i in range(6)] + ['1F95D.png', '1F426.png']
    assert [x['source'] for x in r] == ['fontawesome'] * 6 + ['openmoji'] * 2
    assert r[6]['emoji'] == '\U0001F95D' and r[7]['emoji'] == '\U0001F426'
    for x in r:
        im = Image.open(kiwi / x['file_name'])
        assert im.size == (64, 64) and im.convert('RGB').getpixel((0, 0)) == (255, 255, 255)


def test_the_icon_is_drawn_in_a_different_colour_each_time(kiwi):
    colours, boxes = [], set()
    for i in range(6):
        im = np.asarray(Image.open(kiwi / f'kiwi-bird-{i}.png').convert('RGB'))
        mask = im.min(axis=2) < 200                                  # not white nor the anti-aliased edge
        assert mask.sum() > 0.2 * 64 * 64                            # the bird, not a blank picture
        ink, counts = np.unique(im[mask], axis=0, return_counts=True)
        colours.append(tuple(ink[counts.argmax()]))                  # its flat colour
        ys, xs = np.nonzero(mask)
        boxes.add((xs.min(), ys.min(), xs.max(), ys.max()))
    assert len(set(colours)) == 6                                    # six colours
    assert len(boxes) > 1                                            # and the jitter moves or scales it


def test_same_seed_same_pictures_and_attribution(kiwi, tmp_path):
    build_concept_set(tmp_path, seed=0)
    assert all((tmp_path / x['file_name']).read_bytes() == (kiwi / x['file_name']).read_bytes() for x in rows(kiwi))
    text = (kiwi / 'ATTRIBUTION.txt').read_text(encoding='utf-8')
    assert 'Fonticons, Inc.' in text and 'CC BY 4.0' in text and 'https://fontawesome.com/license/free' in text
    assert 'OpenMoji' in text and 'CC BY-SA 4.0' in text                # the keep rows' licence too


def test_cli_and_unknown_names(tmp_path, capsys):
    out = tmp_path / 'heart'
    assert main(['data', 'icon', '--out', str(out), '--icon', 'heart', '--n', '2', '--size', '16']) == 0
    said = capsys.readouterr().out
    assert said.startswith(f'wrote 2 renders of the heart icon and 0 OpenMoji rows at 16x16 to {out}/')
    assert [x['text'] for x in rows(out)] == ['heart icon'] * 2
    assert 'OpenMoji' not in (out / 'ATTRIBUTION.txt').read_text(encoding='utf-8')
    assert main(['data', 'icon', '--out', str(tmp_path / 'x'), '--icon', 'kiwi-brid']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and "no solid Font Awesome icon 'kiwi-brid': did you mean kiwi-bird?" in err
    assert main(['data', 'icon', '--out', str(tmp_path / 'x'), '--keep', 'kiwi']) == 2
    assert "no OpenMoji emoji named 'kiwi'" in capsys.readouterr().err
    assert main(['data', 'icon', '--out', str(tmp_path / 'x'), '--aliases']) == 2
    assert '--aliases: not a flag of `paella data icon`' in capsys.readouterr().err
    assert main(['data', 'openmoji', '--out', str(tmp_path / 'x'), '--icon', 'heart']) == 2
    assert not (tmp_path / 'x').exists()                             # nothing written on an error
    with pytest.raises(ValueError, match='n must be'):
        build_concept_set(tmp_path / 'y', n=0)
