"""Webdataset shards at scale: a bad sample never stops a run and is named with its shard and key, a stream
that can produce nothing stops with one line saying why, the seed fixes the stream, and `paella preencode`
turns shards into shards of tokens and text states, on N processes, resumably."""
import json
import os
import re
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

import synth
from conftest import REPO
from paella import VQModel
from paella.train import RECIPES, train

ENV = {**os.environ, 'PYTHONPATH': str(REPO), 'HF_HUB_OFFLINE': '1'}


def config(recipe, tmp_path, **kw):
    base = dict(out=str(tmp_path / 'run'), preset='tiny', precision='fp32', warmup=10, image_size=32,
                log_every=1, save_every=1000, tensorboard=False)
    return RECIPES[recipe].config(**{**base, **kw})


def logged(out):
    return [json.loads(line) for line in open(os.path.join(out, 'metrics.jsonl'))]


def within(seconds, fn):
    """fn() in a thread: its result or its exception; a failure (not a hang) if it runs past ``seconds``."""
    result = {}

    def run():
        try:
            result['value'] = fn()
        except BaseException as e:          # handed to the test's thread
            result['error'] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f'still running after {seconds} s'
    if 'error' in result:
        raise result['error']
    return result['value']


def tiny_vqgan(folder):
    torch.manual_seed(0)
    VQModel(VQModel.make_config('tiny')).save_pretrained(folder)
    return folder


def stream(urls, n, **kw):
    from paella.data import webdataset_images
    it = iter(webdataset_images(str(urls), 32, **kw))
    return [next(it) for _ in range(n)]


def test_a_bad_shard_trains_to_the_end_and_skipped_log_names_each_bad_sample(tmp_path, minilm):
    """Garbage json, null json, no caption (the generator needs one), a 0-byte image, broken images and a
    member cut off by a truncated download: each named in skipped.log with its shard and key; the logged
    count is the number of lines."""
    shard = synth.bad_shard(tmp_path / 'shards', 32)
    cfg = config('generator', tmp_path, data=str(shard), vqgan=str(tiny_vqgan(tmp_path / 'vq')), steps=4,
                 batch_size=16)
    train(cfg)
    log = (tmp_path / 'run' / 'skipped.log').read_text().splitlines()
    for key, why in synth.BAD_SAMPLES.items():
        assert any(f': {shard}#{key}: {why}' in line for line in log), (key, log)
    assert not [line for line in log if '#good' in line]
    assert logged(cfg.out)[-1]['skipped'] == len(log)
    assert (tmp_path / 'run' / 'checkpoints' / 'step_0000004.pt').exists()


def test_each_bad_sample_is_reported_once_per_pass(tmp_path):
    shard = synth.bad_shard(tmp_path / 'shards', 32)
    items = within(60, lambda: stream(shard, 16, shuffle=1))           # one pass: 8 good + 8 bad records
    reports = {s['name'].split('#')[1]: s['skip'] for s in items if 'skip' in s}
    assert set(reports) == set(synth.BAD_SAMPLES)
    for key, why in synth.BAD_SAMPLES.items():
        assert reports[key].startswith(why), (key, reports[key])
    assert reports['emptyimage'] == 'empty file'
    assert all(s['image'].shape == (3, 32, 32) for s in items if 'skip' not in s)


def test_the_vqgan_keeps_images_without_caption(tmp_path):
    shard = synth.bad_shard(tmp_path / 'shards', 32)
    items = within(60, lambda: stream(shard, 16, shuffle=1, captions=False))
    kept = {s['name'].split('#')[1] for s in items if 'skip' not in s}
    assert 'nocaption' in kept and len(kept) == 9
    assert 'no caption' not in {s['skip'] for s in items if 'skip' in s}


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, '-m', 'paella.cli', *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize('case', ['min_size', 'missing'])
def test_no_usable_sample_stops_within_60s_with_a_one_line_error(tmp_path, case):
    urls = synth.shards(tmp_path / 'shards') if case == 'min_size' else str(tmp_path / 'gone-{000..001}.tar')
    extra = ['--filters.min-size', '512'] if case == 'min_size' else []
    proc = run_cli('train-vq', '--data', urls, '--out', str(tmp_path / 'run'), '--preset', 'tiny', '--steps', '2',
                   '--batch-size', '4', '--image-size', '32', '--tensorboard', 'false', *extra)
    text = re.sub(r'[^\r\n]*\d+%\|[^\r\n]*it/s\]', '', proc.stderr)       # the progress bar aside
    lines = text.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    expected = ('read 16 samples from 2 shards, kept 0: 16 smaller than min_size 512' if case == 'min_size' else
                'read 0 samples from 2 shards, kept 0: 2 shards unreadable (')
    assert lines[0].startswith('paella train-vq: error: no usable sample: ' + expected), lines[0]
    if case == 'missing':
        assert lines[0].endswith('gone-000.tar: No such file or directory)'), lines[0]


@pytest.mark.parametrize('filters, why', [({'min_aesthetic': 5.0}, '16 without aesthetic (min_aesthetic 5.0)'),
                                          ({'max_unsafe': 0.5}, '16 without punsafe (max_unsafe 0.5)')])
def test_a_filter_drops_samples_that_lack_its_score(tmp_path, filters, why):
    """One rule for every score: a filter that is set drops a sample whose json lacks the score (it cannot
    be checked); a filter left unset never looks at it."""
    from paella.data import NoSamples
    urls = synth.shards(tmp_path / 'shards')                  # json: width, height, pwatermark; no aesthetic, punsafe
    with pytest.raises(NoSamples, match=r'^no usable sample: read 16 samples from 2 shards, kept 0: ') as e:
        within(60, lambda: stream(urls, 1, **filters))
    assert why in str(e.value)
    assert len(within(60, lambda: stream(urls, 20))) == 20   # unset: kept


def test_the_seed_fixes_the_shard_stream(tmp_path):
    """--seed reaches the shard order and the shuffle buffer: the same seed gives the same samples (names
    and crops) in the same order, another seed another order; so two runs give the same weights."""
    urls = synth.shards(tmp_path / 'shards', 4)
    a, b, c = (within(60, lambda: stream(urls, 40, seed=seed, shuffle=16)) for seed in (0, 0, 1))
    assert [s['name'] for s in a] == [s['name'] for s in b] != [s['name'] for s in c]
    assert all(torch.equal(x['image'], y['image']) for x, y in zip(a, b))
    weights = []
    for run in ('one', 'two'):
        train(config('vqgan', tmp_path, data=urls, out=str(tmp_path / run), steps=3, batch_size=4))
        weights.append(load_file(str(tmp_path / run / 'model' / 'model.safetensors')))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
