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


def test_a_bad_shard_trains_to_the_end_and_skipped_log_names_each_bad_sample(tmp_path, tiny_t5_dir):
    """Garbage json, null json, no caption (the generator needs one), a 0-byte image, broken images and a
    member cut off by a truncated download: each named in skipped.log with its shard and key; the logged
    count is the number of lines."""
    shard = synth.bad_shard(tmp_path / 'shards', 32)
    cfg = config('generator', tmp_path, data=str(shard), vqgan=str(tiny_vqgan(tmp_path / 'vq')), steps=4,
                 batch_size=16, text_encoder=f'byt5:{tiny_t5_dir}')
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


def centre_images(url, size=32):
    """{key: (image (3, S, S) as training sees it, caption)} of the samples of one input shard."""
    from paella.data import open_image
    from paella.images import resize_crop
    from paella.shards import read_shard
    return {r['__key__']: (resize_crop(open_image(r['jpg']), size), r['txt'].decode()) for r in read_shard(url)}


def npy(data):
    import io
    import numpy as np
    return torch.from_numpy(np.load(io.BytesIO(data)))


def test_preencode_shards_by_two_processes_resumes_and_trains_like_the_file(tmp_path, tiny_t5_dir, tiny_clip_dir):
    """Each process encodes its share of the input shards; the tokens are the VQGAN's on the same images,
    text states and CLIP embeddings the encoders'; a rerun skips finished shards and clears interrupted
    writes; the trainer gets the rows of a preencode file of the same images, so its loss is the same."""
    from PIL import Image
    from paella.conditioning import byt5_encoder, clip_encoder
    from paella.data import Preencoded, collate, webdataset_images
    from paella.shards import expand, read_shard
    from paella.train.distributed import Slice
    from paella.train.prepare import preencode, preencode_shards
    from paella.train.recipes import GeneratorTask
    urls = synth.shards(tmp_path / 'in', 4, size=32)
    vq, t5, clip = VQModel.from_pretrained(tiny_vqgan(tmp_path / 'vq')), byt5_encoder(tiny_t5_dir), clip_encoder(tiny_clip_dir)
    out = tmp_path / 'pre'
    run = lambda rank: preencode_shards(urls, out, vq, t5, clip, image_size=32, batch_size=8, rank=rank, world=2,
                                        log=lambda line: None)
    assert run(1)[:2] == (2, 16) and sorted(p.name for p in out.glob('*.tar')) == ['00001.tar', '00003.tar']
    assert run(0)[:2] == (2, 16)
    first = (out / '00002.tar').read_bytes()
    (out / '00002.tar').unlink()                              # as if killed while writing it
    (out / '.00002.tar.x1.tmp').write_bytes(first[:1000])
    assert run(0)[:2] == (1, 8) and run(1)[:2] == (0, 0)      # finished shards are skipped
    assert (out / '00002.tar').read_bytes() == first and not list(out.glob('.*.tmp'))
    for i, url in enumerate(expand(urls)):
        images, written = centre_images(url), list(read_shard(str(out / f'{i:05d}.tar')))
        image, caption = (list(x) for x in zip(*(images[r['__key__']] for r in written)))
        assert [r['txt'].decode() for r in written] == caption and len(written) == 8
        with torch.no_grad():
            tokens, text = vq.encode_indices(torch.stack(image)), t5.encode(caption)
            clips = {'clip_text': clip.encode_text(caption), 'clip_image': clip.encode_images(torch.stack(image))}
        assert torch.equal(torch.stack([npy(r['tokens.npy']) for r in written]).long(), tokens)
        for r, states, mask in zip(written, *text):           # the caption's tokens, unpadded (ByT5 pads to
            assert torch.equal(npy(r['text.npy']), states[mask].half())        # the longest of a batch)
        for k, v in clips.items():
            assert torch.equal(torch.stack([npy(r[k + '.npy']) for r in written]), v), k
    # The same 8 images as a folder, pre-encoded into one file: the trainer gets the same rows from both.
    folder = tmp_path / 'folder'
    folder.mkdir()
    for key, (image, caption) in centre_images(expand(urls)[0]).items():
        Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(folder / f'{key}.png')
        (folder / f'{key}.txt').write_text(caption)
    preencode(folder, tmp_path / 'pre.safetensors', vq, t5, clip, image_size=32)
    rows = Preencoded(tmp_path / 'pre.safetensors')
    stream = webdataset_images(str(out / '00000.tar'), 32, shuffle=1, resample=False)
    a, _ = collate(list(stream))
    b, _ = collate([rows[i] for i in range(len(rows))])
    assert set(a) - {'caption', 'name'} == set(b) == {'tokens', 'text', 'text_mask', 'clip_text', 'clip_image'}
    for k in b:
        assert torch.equal(a[k], b[k]), k
    for k in ('uncond_text', 'uncond_clip'):
        assert torch.equal(stream.extras[k], rows.extras[k]), k
    cfg = config('generator', tmp_path, data=str(tmp_path / 'pre.safetensors'), p_drop_clip_image=0.0)
    task = GeneratorTask(cfg, torch.device('cpu'))
    loss = lambda batch: task.loss(task.model, batch, Slice(range(8), 8, torch.Generator().manual_seed(0)))[0]
    assert torch.equal(loss(a), loss(b))
    # The shards themselves: no text encoder loaded, the empty prompt as stored, the VQGAN the shards name.
    shards = config('generator', tmp_path, data=str(out / '{00000..00003}.tar'), p_drop_clip_image=0.0,
                    out=str(tmp_path / 'run-shards'), steps=2, batch_size=4)
    shard_task = GeneratorTask(shards, torch.device('cpu'))
    assert shard_task.encoder is None and torch.equal(shard_task.uncond, task.uncond)
    assert shard_task.model.config == task.model.config
    from paella.train import train
    train(shards)
    assert [row['step'] for row in logged(shards.out)] == [1, 2]


def descendants(pid):
    """The ids of a process's children, grandchildren, ... (from /proc)."""
    from pathlib import Path
    kids = []
    for p in Path('/proc').iterdir():
        try:
            if p.name.isdigit() and int((p / 'stat').read_text().rsplit(')', 1)[1].split()[1]) == pid:
                kids.append(int(p.name))
        except (OSError, ValueError, IndexError):     # the process ended meanwhile
            continue
    return [d for k in kids for d in (k, *descendants(k))]


@pytest.mark.slow
def test_preencode_under_torchrun_killed_and_rerun_ends_equal(tmp_path, minilm):
    """`torchrun --nproc_per_node=2 -m paella.cli preencode` on 4 shards, SIGKILLed once a shard is written
    (each input is read through a slow pipe:), then rerun: it skips the finished shards and ends with the
    bytes one process writes, and no temporary file; the generator trains on them."""
    import signal
    import time
    from paella.train.prepare import preencode_shards
    urls = synth.shards(tmp_path / 'in', 4, size=32)
    vq = tiny_vqgan(tmp_path / 'vq')
    # the reference on one thread, as torchrun starts each worker (OMP_NUM_THREADS=1): float32 sums split
    # over two threads round MiniLM's states differently in the last bits, and some fp16 values with them
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        preencode_shards(urls, tmp_path / 'one', VQModel.from_pretrained(vq), minilm, image_size=32, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    slow = f"pipe:sleep 3; cat {urls}"
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'paella.cli',
           'preencode', slow, str(tmp_path / 'two'), '--vqgan', str(vq), '--image-size', '32']
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / 'two').glob('*.tar')) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    for pid in [*descendants(proc.pid), proc.pid]:          # torchrun starts each worker in its own session
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    finished = sorted(p.name for p in (tmp_path / 'two').glob('*.tar'))
    assert 1 <= len(finished) < 4, finished                  # really interrupted
    rerun = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    wrote = [line for line in rerun.stdout.splitlines() if line.startswith('wrote ')]
    assert len(wrote) == 4 - len(finished) and not any(name in line for line in wrote for name in finished), wrote
    for i in range(4):
        assert (tmp_path / 'two' / f'{i:05d}.tar').read_bytes() == (tmp_path / 'one' / f'{i:05d}.tar').read_bytes()
    assert not list((tmp_path / 'two').glob('.*'))
    cfg = config('generator', tmp_path, data=str(tmp_path / 'two' / '{00000..00003}.tar'), vqgan=str(vq), steps=2,
                 batch_size=8)
    train(cfg)                                                # the trainer reads them as any shards
    assert len(logged(cfg.out)) == 2 and not (tmp_path / 'run' / 'skipped.log').exists()
