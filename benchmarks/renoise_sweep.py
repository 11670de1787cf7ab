"""Quality against speed for each re-noising rule and step count: `paella eval`'s measures (mean over
``--seeds`` eval seeds) and the sampling time per image at batch 8, for every (rule, steps) pair; one JSON
line per pair, then a markdown table and a plot (one panel per measure, ms/image on x, a line per rule,
its points labelled with their step counts).

    python benchmarks/renoise_sweep.py --data runs/openmoji64                       # all 24 pairs, 2 seeds
    python benchmarks/renoise_sweep.py --data runs/openmoji64 --steps 4,6 --rules confidence --seeds 12

``--data`` is a `paella data openmoji` folder at the model's native size (64 px; pictures drawn larger
are averaged down to it). Pairs already in ``--out``.jsonl are
not measured again (a stopped sweep resumes); ``--plot-only`` redraws the table and plot from that file;
``--retime`` measures the times of its rows again (on a machine with nothing else running) and keeps the rest.
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch

MEASURES = [('top1', 'names top-1'), ('paraphrase_top5', 'paraphrase top-5'),
            ('median_psnr_to_target', 'median PSNR to target (dB)'), ('fid16', 'fid16 (lower is better)')]
PROMPTS = ['red apple', 'fire engine', 'grinning face', 'rocket', 'pizza', 'ghost', 'rainbow', 'snowman']


def ms_per_image(pipe, overrides, repeats=3):
    """Best of ``repeats`` timings of the sampler alone (text encoding and decoding left out), batch 8."""
    best = float('inf')
    for _ in range(repeats + 1):                  # the first is a warm-up
        timings = {}
        pipe(PROMPTS, seed=0, timings=timings, **overrides)
        best = min(best, timings['sampling'])
    return best / len(PROMPTS) * 1000


def measure(pipe, data, rule, steps, seeds, n, recon):
    """One row: the eval means over ``seeds`` and the timing. recon: `real_set_psnr` (the same for every row)."""
    from paella_openmoji.eval import evaluate, summarize
    overrides = dict(renoise_rule=rule, steps=steps, caption_temperature=None)   # the prompts as typed
    t0 = time.perf_counter()
    summary = summarize([evaluate(pipe, data, n=n, seed=s, recon=recon, **overrides) for s in range(seeds)])
    return {'rule': rule, 'steps': steps, 'seeds': seeds, 'ms_per_image': round(ms_per_image(pipe, overrides), 1),
            **{k: summary[k]['mean'] for k, _ in MEASURES}, 'eval_s': round(time.perf_counter() - t0, 1)}


def table(rows):
    head = '| rule | steps | ms/image (batch 8) | ' + ' | '.join(label for _, label in MEASURES) + ' |'
    lines = [head, '|' + ' --- |' * (3 + len(MEASURES))]
    for r in sorted(rows, key=lambda r: (r['rule'], r['steps'])):
        lines.append(f"| {r['rule']} | {r['steps']} | {r['ms_per_image']} | "
                     + ' | '.join(str(r[k]) for k, _ in MEASURES) + ' |')
    return '\n'.join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for ax, (key, label) in zip(axes.flat, MEASURES):
        for rule in dict.fromkeys(r['rule'] for r in rows):
            mine = sorted((r for r in rows if r['rule'] == rule), key=lambda r: r['steps'])
            ax.plot([r['ms_per_image'] for r in mine], [r[key] for r in mine], marker='o', label=rule)
            for r in mine:
                ax.annotate(str(r['steps']), (r['ms_per_image'], r[key]), fontsize=7, xytext=(3, 3),
                            textcoords='offset points')
        ax.set_xlabel('ms per image (batch 8, this CPU)')
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(title='re-noising rule')
    seeds = rows[0]['seeds']
    fig.suptitle(f'Default emoji model: quality against sampling time (points: steps; mean of {seeds} eval seeds)')
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', required=True, help='a `paella data openmoji` folder (the real renders)')
    p.add_argument('--model', default=None, help='pipeline folder (default: the shipped emoji model)')
    p.add_argument('--steps', default='2,3,4,6,8,12')
    p.add_argument('--rules', default='random,confidence,halton,critic')
    p.add_argument('--seeds', type=int, default=2, help='eval seeds 0 .. K-1 per pair')
    p.add_argument('--n', type=int, default=200, help='emoji per eval seed (as paella eval)')
    p.add_argument('--out', default='docs/renoise_sweep', help='writes OUT.jsonl and OUT.png')
    p.add_argument('--plot-only', action='store_true')
    p.add_argument('--retime', action='store_true', help="time the file's rows again, keep their quality")
    args = p.parse_args()
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    out = Path(args.out)
    file = out.with_suffix('.jsonl')
    rows = [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []
    if args.retime:
        from paella.pipeline import Pipeline
        pipe = Pipeline.from_pretrained(args.model)
        for r in rows:
            with torch.inference_mode():
                r['ms_per_image'] = round(ms_per_image(pipe, dict(renoise_rule=r['rule'], steps=r['steps'])), 1)
            print(json.dumps(r), flush=True)
        file.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    elif not args.plot_only:
        from paella.pipeline import Pipeline
        from paella_openmoji.eval import load_real, real_set_psnr
        pipe = Pipeline.from_pretrained(args.model)
        recon = real_set_psnr(pipe, load_real(args.data))
        done = {(r['rule'], r['steps']) for r in rows}
        for rule in args.rules.split(','):
            for steps in map(int, args.steps.split(',')):
                if (rule, steps) in done:
                    continue
                with torch.inference_mode():
                    rows.append(measure(pipe, args.data, rule, steps, args.seeds, args.n, recon))
                print(json.dumps(rows[-1]), flush=True)
                with file.open('a') as f:
                    f.write(json.dumps(rows[-1]) + '\n')
    print(table(rows))
    plot(rows, out.with_suffix('.png'))


if __name__ == '__main__':
    main()
