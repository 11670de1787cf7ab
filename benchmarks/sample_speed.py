"""Sampling speed against the published computation, side by side in one run; one JSON line per case.

Variants (each a set of switches of `paella.sample` and the model):
- reference: the published way: two forwards per CFG step, attention as nn.MultiheadAttention computes it
  (explicit softmax), torch.norm in the response norm, the softmax -> permute -> multinomial step,
  float32, conditioning recomputed every step;
- exact: the same tokens faster: SDPA attention, sum-of-squares norm, one batched CFG forward, cached
  conditioning keys/values (float32, multinomial);
- bf16: `exact` with bfloat16 weights;
- default: what `Pipeline` uses on this device (paella.speed): `exact` + the inverse-CDF step, in bf16
  where native; ``--compile`` adds default+compile.

Every line has ms per image, images/s, the model FLOPs per image (torch.utils.flop_counter, forwards
only) and the fraction of this machine's matmul peak (measured in the same run, bf16 or fp32 as the
variant computes) that they amount to; variants other than the reference report their speed-up and the
fraction of tokens equal to the reference's (same seed; `default` draws its random numbers differently,
so its agreement is that of two independent samples).

    python benchmarks/sample_speed.py                 # default model (batch 1, 8) + 114M at 32x32 (batch 2)
    python benchmarks/sample_speed.py --cases steps   # the shipped settings against 12 published steps
    python benchmarks/sample_speed.py --cases v3 --device cuda --compile    # the v3 config on a GPU
"""
import argparse
import json
import os
import time

import torch


def peak_gflops(dtype, device, n=2048, repeats=5):
    """Best GFLOP/s of an n x n matmul."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float('inf')
    for _ in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def forward_flops(model, inputs, shape, device):
    """FLOPs of one forward at batch shape[0] (tokens of ``shape``)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randint(0, model.num_labels, shape, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, torch.full((shape[0],), 0.5, device=device), **inputs)
    return counter.get_total_flops()


VARIANTS = {
    'reference': dict(published=True, dtype=torch.float32, sampling=dict(mode='multinomial', batch_cfg=False, cache=False)),
    'exact': dict(published=False, dtype=torch.float32, sampling=dict(mode='multinomial', batch_cfg=True, cache=True)),
    'bf16': dict(published=False, dtype=torch.bfloat16, sampling=dict(mode='multinomial', batch_cfg=True, cache=True)),
}

# the default model's prompts (batch b takes the first b, repeated past 8)
PROMPTS = ['red apple', 'fire engine', 'grinning face', 'rocket', 'pizza', 'ghost', 'rainbow', 'snowman']


def timed(run, device, repeats):
    """(the warm-up's result, the best of ``repeats`` timed calls in seconds); the warm-up also compiles."""
    out = run()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return out, min(times)


def run_case(name, model, cond, uncond, shape, settings, device, repeats, peaks, variants, compile_=False):
    """Time `sample` for each variant; print and return the JSON lines."""
    from paella import sample
    from paella.speed import FAST_SAMPLING, compile_model, default_dtype
    variants = dict(variants)
    variants['default'] = dict(published=False, dtype=default_dtype(device), sampling=FAST_SAMPLING)
    if compile_:
        variants['default+compile'] = dict(variants['default'], compile=True)
    b = shape[0]
    # conditional + unconditional per step (CFG), and the 'critic' rule's conditional forward after each
    # re-noising step
    steps = settings['steps']
    renoise_steps = settings.get('renoise_steps')
    renoising = steps - 1 if renoise_steps is None else min(renoise_steps, steps - 1)
    forwards = steps * 2 + (renoising if settings.get('renoise_rule') == 'critic' else 0)
    rows, reference = [], None
    for vname, v in variants.items():
        m = model.to(v['dtype']).set_published_math(v['published'])
        runner = compile_model(m, device) if v.get('compile') else m
        c = {k: t.to(v['dtype']) if isinstance(t, torch.Tensor) else t for k, t in cond.items()}
        u = {k: t.to(v['dtype']) if isinstance(t, torch.Tensor) else t for k, t in uncond.items()}
        run = lambda: sample(runner, c, shape, u, generator=torch.Generator(device).manual_seed(0),
                             **settings, **v['sampling'])
        tokens, sec = timed(run, device, repeats)
        flops = forward_flops(m, c, shape, device) / b * forwards
        peak = peaks['bf16' if v['dtype'] == torch.bfloat16 else 'fp32']
        row = {'case': name, 'variant': vname, 'batch': b, 'tokens': list(shape[1:]), 'steps': settings['steps'],
               'dtype': str(v['dtype']).replace('torch.', ''), 'ms_per_image': round(sec / b * 1000, 1),
               'images_per_s': round(b / sec, 2), 'gflop_per_image': round(flops / 1e9, 2),
               'peak_fraction': round(flops / 1e9 * b / sec / peak, 3)}
        if reference is None:
            reference = (sec, tokens)
        else:
            row['speedup'] = round(reference[0] / sec, 2)
            row['token_agreement'] = round((tokens == reference[1]).float().mean().item(), 4)
        print(json.dumps(row), flush=True)
        rows.append(row)
    model.to(torch.float32).set_published_math(False)
    return rows


def default_model_case(batch, device, repeats, peaks, compile_):
    from paella.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(device=device, dtype=torch.float32)
    s = pipe.settings
    cond, uncond, _ = pipe.conditions((PROMPTS * batch)[:batch])
    settings = dict(steps=s.steps, renoise_steps=s.renoise_steps, temperature=s.temperature, cfg=s.cfg,
                    renoise_rule=s.renoise_rule)
    return run_case('default_model', pipe.generator, cond, uncond, (batch, *s.latent_size), settings, device,
                    repeats, peaks, VARIANTS, compile_)


def steps_case(batch, device, repeats):
    """The shipped pipeline as it loads, its own settings (steps, re-noising rule) against the 12-step
    published-rule settings it shipped with before, same weights, prompts and draw: the speed-up of the
    fewer-step default."""
    from paella import sample
    from paella.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(device=device)
    s = pipe.settings
    cond, uncond, _ = pipe.conditions((PROMPTS * batch)[:batch])
    common = dict(mode=s.mode, batch_cfg=s.batch_cfg, cache=s.cache)
    cases = {'12_steps_random': dict(steps=12, renoise_steps=11, renoise_rule='random', temperature=(0.7, 0.05),
                                     cfg=(3.0, 1.25)),
             f'{s.steps}_steps_{s.renoise_rule}': dict(steps=s.steps, renoise_steps=s.renoise_steps,
                                                      renoise_rule=s.renoise_rule, temperature=s.temperature,
                                                      cfg=s.cfg)}
    rows = []
    for name, settings in cases.items():
        run = lambda: sample(pipe.runner, cond, (batch, *s.latent_size), uncond, **settings, **common,
                             generator=torch.Generator(device).manual_seed(0))
        sec = timed(run, device, repeats)[1]
        row = {'case': 'default_steps', 'variant': name, 'batch': batch, 'steps': settings['steps'],
               'renoise_rule': settings['renoise_rule'], 'dtype': str(next(pipe.generator.parameters()).dtype)[6:],
               'ms_per_image': round(sec / batch * 1000, 1)}
        if rows:
            row['speedup'] = round(rows[0]['ms_per_image'] / row['ms_per_image'], 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def random_model_case(name, preset, tokens, batch, text_len, device, repeats, peaks, compile_, variants=VARIANTS):
    """A model of ``preset`` with seeded random weights; random text states, zeros for the unconditional
    branch (as the published sampler does)."""
    from paella import Paella
    torch.manual_seed(0)
    model = Paella(Paella.make_config(preset, dropout=0.0)).eval().to(device)
    g = torch.Generator().manual_seed(1)
    byt5 = torch.randn(batch, text_len, model.config.byt5_embd, generator=g).to(device)
    cond, uncond = {'byt5': byt5}, {'byt5': torch.zeros_like(byt5)}
    settings = dict(steps=12, renoise_steps=11, temperature=(1.0, 0.2), cfg=4.0)
    return run_case(name, model, cond, uncond, (batch, tokens, tokens), settings, device, repeats, peaks,
                    variants, compile_)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--cases', default='default,steps,base', help='comma-separated: default, steps, base, v3')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--compile', action='store_true', help='also time the default variant under torch.compile')
    p.add_argument('--threads', type=int, help='torch CPU threads (default: all cores)')
    p.add_argument('--batches', default='1,8', help='default model: batch sizes (default: %(default)s)')
    args = p.parse_args()
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    peaks = {'fp32': peak_gflops(torch.float32, device), 'bf16': peak_gflops(torch.bfloat16, device)}
    print(json.dumps({'case': 'matmul_peak', 'device': device, 'threads': torch.get_num_threads(),
                      'gflops_fp32': round(peaks['fp32'], 1), 'gflops_bf16': round(peaks['bf16'], 1)}), flush=True)
    cases = args.cases.split(',')
    if 'default' in cases:
        for batch in (int(b) for b in args.batches.split(',')):
            default_model_case(batch, device, args.repeats, peaks, args.compile)
    if 'steps' in cases:      # the shipped settings against the 12-step published rule
        for batch in (int(b) for b in args.batches.split(',')):
            steps_case(batch, device, args.repeats)
    if 'base' in cases:       # 115M parameters (preset 'base'), 32x32 tokens, batch 2, CFG
        random_model_case('base_114M_32x32', 'base', 32, 2, 77, device, args.repeats, peaks, args.compile)
    if 'v3' in cases:
        if torch.device(device).type != 'cuda':
            print(json.dumps({'case': 'v3_64x64', 'skipped': 'needs a CUDA device (1B parameters, 64x64 tokens)'}))
        else:
            fast = {k: v for k, v in VARIANTS.items() if k != 'reference'}   # no fp32 MHA reference at 1B
            for batch in (1, 8):
                random_model_case('v3_64x64', 'v3', 64, batch, 77, device, args.repeats, peaks, args.compile, fast)


if __name__ == '__main__':
    main()
