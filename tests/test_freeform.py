"""The free-form report (recipes/openmoji/freeform.py, `paella eval --freeform`): its prompts are held out of
the training captions and point at real emoji, its clean threshold passes real drawings and fails
speckled ones, and the command reports every measure."""
import json

import pytest
from paella_openmoji import PARAPHRASES, build_dataset, catalogue
from paella_openmoji.dataset import build
from paella_openmoji import freeform
from paella_openmoji.eval import load_real

from paella.cli import main


def words(text):
    return frozenset(text.lower().split())


@pytest.fixture(scope='module')
def renders(tmp_path_factory):
    """Every OpenMoji render at 64 px with the alias captions (what training reads, besides CLDR keywords)."""
    folder = tmp_path_factory.mktemp('openmoji') / 'emoji'
    build_dataset(folder, size=64, aliases=True)
    return folder


def test_prompts_are_many_held_out_and_point_at_real_emoji(renders, tmp_path):
    names = {name for _, name, _, _, _ in catalogue()}
    assert len(freeform.FREEFORM) >= 150 and len(freeform.GENERIC) == 20
    assert len({p for p, _ in freeform.FREEFORM}) == len(freeform.FREEFORM)
    assert all(target in names for _, target in freeform.FREEFORM if target is not None)
    assert freeform.SPECIFIC in names
    # every caption that models trained before the free-form set could see: names, short names (paraphrases
    # were held out already; 'coffee' is one)
    build(tmp_path / 'all', size=16, aliases=True, exclude=[p for p, _ in PARAPHRASES])
    meta = (tmp_path / 'all' / 'metadata.jsonl').read_text().splitlines()
    captions = {words(json.loads(line)['text']) for line in meta}
    prompts = [p for p, _ in freeform.FREEFORM] + freeform.GENERIC
    assert [p for p in prompts if words(p) in captions] == []


def test_build_dataset_keeps_them_out_of_the_captions(tmp_path):
    cldr = {'annotations': {'annotations': {'#️⃣': {'default': ['hash sign', 'red apple shiny a', 'cat a']}}}}
    (tmp_path / 'a.json').write_text(json.dumps(cldr, ensure_ascii=False))
    build_dataset(tmp_path / 'e', size=16, limit=1, keywords=[tmp_path / 'a.json'])
    texts = {json.loads(line)['text'] for line in (tmp_path / 'e' / 'metadata.jsonl').read_text().splitlines()}
    assert 'hash sign' in texts and not texts & {'red apple shiny a', 'cat a'}      # 'a shiny red apple', 'a cat'


def test_clean_threshold_passes_real_drawings_and_fails_speckled_ones(renders):
    import torch
    from paella.pipeline import Pipeline
    c = freeform.calibrate(Pipeline.from_pretrained(dtype=torch.float32), load_real(renders))
    assert max(c['worst_shift'], c['worst_blur32']) + 0.5 < freeform.CLEAN_THRESHOLD < c['mess_t0.3_p1'] - 0.5, c
    real = load_real(renders)
    apple = real['red apple']
    feats = freeform.features(list(real.values()))
    d, i = freeform.nearest([freeform.shifted(apple, 2, -2)], feats)
    assert list(real)[int(i[0])] == 'red apple' and float(d[0]) < 1.0          # lined up again before comparing


def test_eval_freeform_reports_every_measure(renders, capsys):
    assert main(['eval', '--freeform', '--regional', '2']) == 2
    assert 'different reports: give one' in capsys.readouterr().err
    assert main(['eval', '--freeform', '--data', str(renders), '--n', '8', '--steps', '1']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['freeform'] == len(freeform.FREEFORM)
    for key in ('freeform_clean', 'freeform_intended_top1', 'freeform_intended_top5', 'names_clean'):
        assert 0 <= report[key] <= 1, key
    assert 0 <= report['generic_distinct'] <= freeform.SEEDS and 0 <= report['specific_hits'] <= freeform.SEEDS
    assert 0 <= report['generic_clean'] <= 1
