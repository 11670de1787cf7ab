"""Paella v3 at full size on this machine: wall time and peak memory per stage, the demo's way and ours.

No download: the models are built with random weights at the official shapes. ``--make`` writes into
``--dir`` paella_v3.pt, prior_v1.pt and vqgan_f4.pt (bare state dicts, like the official files), byt5-xl/
(ByT5-XL's encoder from google/byt5-xl's published config, as pytorch_model.bin like that repository's) and
clip-h/ (CLIP ViT-H-14 from its published config, with a byte-level vocabulary), then runs ``paella
convert-v3`` into pipeline/ (its peak memory is reported too).

One 256x256 image (64x64 tokens) at the demo's settings (`Settings.v3`: prior 60 DDPM steps at cfg 3; 32
sampler steps, cfg 8 for the first 20), each way in a fresh process:

- ``low``: ``Pipeline.from_pretrained(dir/pipeline, low_memory=True)`` and one ``pipe(prompt)`` call;
- ``keep``: the same with low_memory=False (every model loaded at once: needs ~20 GB);
- ``demo``: as the published demo (its app.py) runs it: every model float32 except CLIP (cast to half),
  built (randomly initialised) then filled from ``torch.load``, all loaded before the first prompt and held,
  the published sampler switches (two forwards per guided step, the conditioning recomputed each step, the
  softmax -> multinomial draw). Its models do not fit 24 GB together, so each stage runs in its own process
  with what the demo holds for it; the demo's peak is then the sum of what each stage holds after loading
  plus the largest working memory any stage needs on top.

Peak memory is the process's peak resident set (VmHWM in /proc/self/status, weights read through memory
maps included), reset before each stage (/proc/self/clear_refs). One JSON line per stage:

    python benchmarks/v3_memory.py --dir /data/v3 --make          # once: ~30 GB of random weights
    python benchmarks/v3_memory.py --dir /data/v3 --ways low,demo  # writes docs/v3_memory.jsonl
    python benchmarks/v3_memory.py --dir /data/v3 --ways low --steps 2 --prior-steps 2   # a quick look
"""
import argparse
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPT = 'a photo of a red apple on a wooden table, studio lighting'
# google/byt5-xl's config.json (the encoder is built from it; the decoder is left out)
BYT5_XL = dict(d_model=2560, d_ff=6720, d_kv=64, num_heads=32, num_layers=36, num_decoder_layers=12,
               feed_forward_proj='gated-gelu', vocab_size=384, relative_attention_num_buckets=32,
               tie_word_embeddings=False, layer_norm_epsilon=1e-6, eos_token_id=1, pad_token_id=0)
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K's towers (986M parameters)
CLIP_H_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, hidden_act='gelu')
CLIP_H_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                     patch_size=14, image_size=224, hidden_act='gelu')


def memory():
    """(current, peak) resident set of this process, in GB."""
    status = dict(line.split(':', 1) for line in Path('/proc/self/status').read_text().splitlines())
    return tuple(int(status[k].split()[0]) / 2 ** 20 for k in ('VmRSS', 'VmHWM'))


class Stages:
    """Wall time and peak memory of named stages, which may nest (an enclosing stage's peak is the highest
    of its own and its inner stages'); a stage entered several times adds its seconds and keeps its highest
    peak. Prints one JSON line per stage at the end."""

    def __init__(self, way, **info):
        self.way, self.info, self.rows, self.open = way, info, {}, []

    def _note_peak(self):
        """The peak since the last reset counts for every open stage."""
        peak = memory()[1]
        for name in self.open:
            self.rows[name]['peak_gb'] = max(self.rows[name]['peak_gb'], peak)

    @contextmanager
    def __call__(self, name):
        self._note_peak()
        self.rows.setdefault(name, {'seconds': 0.0, 'peak_gb': 0.0})
        self.open.append(name)
        Path('/proc/self/clear_refs').write_text('5')           # the peak restarts from the current RSS
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.rows[name]['seconds'] += time.perf_counter() - t0
            self._note_peak()
            self.open.pop()
            self.rows[name]['after_gb'] = memory()[0]

    def wrap(self, name, fn):
        def staged(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)
        return staged

    def report(self):
        for name, row in self.rows.items():
            print(json.dumps({'way': self.way, 'stage': name, **{k: round(v, 2) for k, v in row.items()},
                              **self.info}), flush=True)


def make(folder):
    """Random weights at the official shapes, saved as the official files are, then convert-v3."""
    sys.path.insert(0, str(REPO / 'tests'))
    from hf_tiny import save_clip, save_t5
    from paella import Paella, VQModel
    from paella.prior import PriorModel
    folder.mkdir(parents=True, exist_ok=True)
    for name, build in [('paella_v3.pt', lambda: Paella(Paella.make_config('v3'))),
                        ('prior_v1.pt', lambda: PriorModel()), ('vqgan_f4.pt', lambda: VQModel())]:
        if not (folder / name).is_file():
            torch.manual_seed(0)
            torch.save(build().state_dict(), folder / name)
            print(f'wrote {folder / name}', flush=True)
    if not (folder / 'byt5-xl' / 'pytorch_model.bin').is_file():
        save_t5(folder / 'byt5-xl', bin=True, **BYT5_XL)
        print(f'wrote {folder / "byt5-xl"}', flush=True)
    if not (folder / 'clip-h' / 'model.safetensors').is_file():
        save_clip(folder / 'clip-h', projection_dim=1024, text=CLIP_H_TEXT, vision=CLIP_H_VISION)
        print(f'wrote {folder / "clip-h"}', flush=True)
    return child(folder, 'convert')


def child(folder, run, *flags):
    """Run one way (or demo stage, or the conversion) in a fresh process; its JSON rows (also printed)."""
    out = subprocess.run([sys.executable, __file__, '--dir', str(folder), '--run', run, *flags], check=True,
                         capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith('{')]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def run_convert(folder):
    """paella convert-v3 in this process, its peak measured like the stages'."""
    from paella.cli import main
    stages = Stages('convert-v3')
    with stages('convert'):
        assert main(['convert-v3', str(folder / 'pipeline'), '--paella', str(folder / 'paella_v3.pt'),
                     '--vqgan', str(folder / 'vqgan_f4.pt'), '--prior', str(folder / 'prior_v1.pt'),
                     '--byt5', str(folder / 'byt5-xl'), '--clip', str(folder / 'clip-h')]) == 0
    stages.report()


def run_ours(folder, low_memory, device, overrides):
    """One pipe(prompt) call, its stages timed through wrappers of the functions the pipeline calls."""
    import tempfile

    import paella.pipeline as pipeline_module
    from paella.pipeline import Pipeline
    stages = Stages('low' if low_memory else 'keep', device=device, **overrides)
    with stages('load'):
        pipe = Pipeline.from_pretrained(folder / 'pipeline', device=device, low_memory=low_memory,
                                        cache=Path(tempfile.mkdtemp(prefix='paella-v3-cache-')))
    pipe.text_encoder.encode = stages.wrap('text: ByT5-XL', pipe.text_encoder.encode)
    pipe.clip.encode_text = stages.wrap('text: CLIP-H', pipe.clip.encode_text)
    if low_memory:
        pipe.prior.load = stages.wrap('prior: load', pipe.prior.load)
    pipeline_module.sample_prior = stages.wrap('prior', pipeline_module.sample_prior)
    pipeline_module.sample = stages.wrap('sampler', pipeline_module.sample)
    pipe.decode = stages.wrap('decode', pipe.decode)
    with stages('total, after load'):
        image = pipe(PROMPT, seed=0, **overrides)[0]
    with stages('text again (from the embedding cache)'):
        pipe.encode_text([PROMPT])
    assert image.size == (256, 256)
    stages.info['dtype'] = str(next(pipe.generator.parameters()).dtype).removeprefix('torch.')
    stages.report()


def run_demo(folder, stage, device, overrides):
    """One stage the demo's way: its models built and filled from torch.load, float32, then used."""
    base = memory()[0]                  # this process before any model (subtracted when stages are summed)
    from paella import Paella, VQModel, sample
    from paella.guidance import v3_attn_weights
    from paella.prior import PriorModel, sample_prior
    from paella.settings import Settings
    s = Settings.v3()
    s = replace(s, **overrides)
    stages = Stages('demo', device=device, **overrides)
    g = torch.Generator(device).manual_seed(0)

    def filled(model, file):                 # the demo: model = Model(); model.load_state_dict(torch.load(f))
        model.load_state_dict(torch.load(folder / file, map_location=device))
        return model.to(device).eval().requires_grad_(False)
    with torch.inference_mode():
        if stage == 'text':
            from transformers import AutoTokenizer, ByT5Tokenizer, CLIPModel, T5EncoderModel
            with stages(f'{stage}: load'):
                t5 = T5EncoderModel.from_pretrained(str(folder / 'byt5-xl')).to(device)
                clip = CLIPModel.from_pretrained(str(folder / 'clip-h')).to(device).half()
                tok, clip_tok = ByT5Tokenizer(), AutoTokenizer.from_pretrained(str(folder / 'clip-h'))
            with stages(stage):
                for text in (PROMPT, ''):
                    t5(input_ids=tok([text], return_tensors='pt').input_ids.to(device))
                    clip.get_text_features(**clip_tok([text], return_tensors='pt').to(device))
        elif stage == 'prior':
            with stages(f'{stage}: load'):
                prior = filled(PriorModel(), 'prior_v1.pt')
            with stages(stage):
                sample_prior(prior, torch.randn(1, 1024, generator=g, device=device), steps=s.prior_steps,
                             cfg=s.prior_cfg, generator=g)
        elif stage == 'sampler':
            with stages(f'{stage}: load'):
                model = filled(Paella(Paella.make_config('v3')), 'paella_v3.pt')
            length = len(PROMPT.encode()) + 1                   # ByT5: one token a byte, and </s>
            cond = {'byt5': torch.randn(1, length, 2560, generator=g, device=device),
                    'clip': torch.randn(1, 1024, generator=g, device=device),
                    'clip_image': torch.randn(1, 1024, generator=g, device=device)}
            uncond = {'byt5': torch.randn(1, 1, 2560, generator=g, device=device), 'clip': cond['clip'], 'clip_image': None}
            with stages(stage):
                sample(model, cond, (1, *s.latent_size), uncond, steps=s.steps, renoise_steps=s.renoise_steps,
                       temperature=s.temperature, cfg=s.cfg, sampling_conditional_steps=s.sampling_conditional_steps,
                       attn_weights=v3_attn_weights(length).to(device), mode='multinomial', generator=g)
        elif stage == 'decode':
            with stages(f'{stage}: load'):
                vq = filled(VQModel(), 'vqgan_f4.pt')
            with stages(stage):
                vq.decode_indices(torch.randint(0, 8192, (1, *s.latent_size), generator=g, device=device))
    stages.info['base_gb'] = round(base, 2)
    stages.report()


DEMO_ORDER = ('text', 'decode', 'prior', 'sampler')     # app.py loads ByT5 and CLIP, the VQGAN, the prior, Paella


def summarize(rows):
    """The demo's peak in one process, from its stages run apart. It loads every model in DEMO_ORDER, then
    uses them, holding all. A stage holds what stays resident after its use (weights read through a memory
    map become resident when first used, not when loaded); the peak is the highest of (what the earlier
    stages hold + this load's peak) and (what all hold + the most any stage's use needs on top)."""
    demo = {r['stage']: r for r in rows if r['way'] == 'demo'}
    if not demo:
        return None
    base = min(r['base_gb'] for r in demo.values())
    held, peak = 0.0, 0.0
    for stage in DEMO_ORDER:
        peak = max(peak, held + demo[f'{stage}: load']['peak_gb'] - base)
        held += max(demo[stage]['after_gb'], demo[f'{stage}: load']['after_gb']) - base
    extra = max(demo[s]['peak_gb'] - demo[s]['after_gb'] for s in DEMO_ORDER)
    return {'way': 'demo', 'stage': 'all models held (from the stages)', 'peak_gb': round(base + max(peak, held + extra), 2),
            'held_gb': round(held, 2), 'base_gb': round(base, 2),
            'seconds': round(sum(demo[s]['seconds'] for s in DEMO_ORDER), 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dir', type=Path, required=True, help='where the random full-size weights are (or go)')
    p.add_argument('--make', action='store_true', help='write the weights and the pipeline folder first')
    p.add_argument('--ways', default='low,demo', help='low, keep, demo (comma-separated; default: %(default)s)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--steps', type=int, help="the sampler's steps (default: the demo's 32)")
    p.add_argument('--prior-steps', type=int, help="the prior's steps (default: the demo's 60)")
    p.add_argument('--out', type=Path, default=REPO / 'docs' / 'v3_memory.jsonl', help='JSON lines appended here')
    p.add_argument('--summarize', action='store_true', help="only the demo's total, from the last demo rows in --out")
    p.add_argument('--run', help=argparse.SUPPRESS)                  # one way (or demo stage) in this process
    args = p.parse_args()
    if args.summarize:
        rows = [json.loads(line) for line in args.out.read_text().splitlines()]
        total = summarize([r for r in rows if r['stage'] != 'all models held (from the stages)'])
        print(json.dumps(total))
        return
    overrides = {k: v for k, v in (('steps', args.steps), ('prior_steps', args.prior_steps)) if v is not None}
    if args.steps is not None:
        overrides['sampling_conditional_steps'] = min(20, args.steps)
        overrides['renoise_steps'] = max(0, args.steps - 6)
    if args.run:
        if args.run == 'convert':
            return run_convert(args.dir)
        if args.run.startswith('demo:'):
            return run_demo(args.dir, args.run[5:], args.device, overrides)
        return run_ours(args.dir, args.run == 'low', args.device, overrides)
    rows = make(args.dir) if args.make else []
    flags = ['--device', args.device] + [f'--{k.replace("_", "-")}={v}' for k, v in
                                         (('steps', args.steps), ('prior_steps', args.prior_steps)) if v is not None]
    for way in [w for w in args.ways.split(',') if w]:
        for run in [f'demo:{s}' for s in ('text', 'prior', 'sampler', 'decode')] if way == 'demo' else [way]:
            rows += child(args.dir, run, *flags)
    total = summarize(rows)
    if total:
        rows.append(total)
        print(json.dumps(total))
    stamp = {'date': time.strftime('%Y-%m-%d'), 'torch': torch.__version__}
    with open(args.out, 'a') as f:
        for r in rows:
            f.write(json.dumps({**r, **stamp}) + '\n')


if __name__ == '__main__':
    main()
