"""The LoRA worked example, measured: a Twemoji style taught to the shipped emoji model by adapters trained
on N images of the new style, scored on 50 concepts none of them saw.

For each N: `paella data twemoji --n N` (N Twemoji renders captioned "<name>, twemoji style", and the same
concepts' OpenMoji renders under the plain name), `paella finetune` in a process of its own (wall time and
peak RSS from the kernel's accounting of that process, `os.wait4`), the adapter folder's size, then with
the adapter loaded: `paella eval --style twemoji` on the 50 held-out concepts (mean over --seeds) and the
names report (top-1 / top-5 on 200 emoji names, seed 0) beside the base model's. One JSON line per N.

    python benchmarks/lora_styles.py --runs runs/lora --data runs/openmoji64 [--n 10 30 100 300] [--save]
    python benchmarks/lora_styles.py --runs runs/lora-cost --n 100 --cost-only     # on an otherwise idle machine

A run folder that already holds a finished adapter is evaluated, not trained again (its cost line is the
one saved when it trained, in RUNS/twemoji<N>/cost.json).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def paella(*args):
    return [sys.executable, '-m', 'paella.cli', *map(str, args)]


def last_json(cmd):
    """What a report prints last, as JSON: its summary line, or its one report (printed indented)."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return json.loads(out.splitlines()[-1])


def measured(cmd):
    """Run ``cmd``; (wall seconds, peak RSS in GiB) of its process (and the most of any child it waited for)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode})")
    return time.perf_counter() - t0, usage.ru_maxrss / 2 ** 20            # ru_maxrss: KiB on Linux


def train(args, n):
    data, run = Path(args.runs) / f'data{n}', Path(args.runs) / f'twemoji{n}'
    if not (data / 'metadata.jsonl').is_file():
        subprocess.run(paella('data', 'twemoji', '--out', data, '--n', n), check=True, capture_output=True)
    cost_file = run / 'cost.json'
    if not cost_file.is_file():
        wall, rss = measured(paella('finetune', '--data', data, '--out', run, '--steps', args.steps, '--ema', args.ema,
                                    '--save-every', args.steps, '--seed', args.seed, '--tensorboard', 'false'))
        cost_file.write_text(json.dumps({'train_s': round(wall, 1), 'peak_rss_gib': round(rss, 2)}))
    adapter = run / ('ema' if args.ema else 'model')
    size = sum(f.stat().st_size for f in adapter.iterdir()) / 2 ** 20
    return adapter, {**json.loads(cost_file.read_text()), 'adapter_mib': round(size, 2)}


def scores(args, lora=None):
    saved = Path(args.runs) / f"scores-{Path(lora).parent.name if lora else 'base'}-{args.seeds}.json"
    if saved.is_file():             # kept from an earlier run of this script (remove it to measure again)
        return json.loads(saved.read_text())
    # the base as an adapter runs it: prompts as typed (with an adapter on, the retrieval prior is off)
    extra = ['--lora', lora] if lora else ['--caption-temperature', 'none']
    style = last_json(paella('eval', '--data', args.data, '--style', 'twemoji', '--seeds', args.seeds, *extra))
    names = last_json(paella('eval', '--data', args.data, *extra))
    mean = (lambda v: v['mean']) if args.seeds > 1 else (lambda v: v)
    keys = ('style_rate', 'plain_rate', 'style_top1', 'style_top5')
    row = {**{k: mean(style[k]) for k in keys if k in style}, 'names_top1': names['top1'], 'names_top5': names['top5']}
    saved.write_text(json.dumps(row))
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--runs', default='runs/lora', help='folder for the data sets and runs')
    p.add_argument('--data', default='runs/openmoji64', help='OpenMoji renders (paella data openmoji)')
    p.add_argument('--n', type=int, nargs='+', default=[10, 30, 100, 300], help='style images per adapter')
    p.add_argument('--steps', type=int, default=600)
    p.add_argument('--ema', type=float, default=0.99)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--seeds', type=int, default=3, help='eval seeds of the style report')
    p.add_argument('--cost-only', action='store_true', help='train and measure the cost, no evaluation')
    p.add_argument('--save', action='store_true', help='append the lines to docs/lora_styles.jsonl')
    args = p.parse_args()
    # the base model first: the curve's starting point
    rows = [] if args.cost_only else [{'n': 0, 'adapter': None, **scores(args)}]
    for n in args.n:
        adapter, cost = train(args, n)
        rows.append({'n': n, 'steps': args.steps, **cost, **({} if args.cost_only else scores(args, adapter))})
    for row in rows:
        print(json.dumps(row), flush=True)
        if args.save:
            with open(ROOT / 'docs' / 'lora_styles.jsonl', 'a') as f:
                f.write(json.dumps(row) + '\n')


if __name__ == '__main__':
    main()
