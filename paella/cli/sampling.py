"""Commands that draw: generate, the six editing modes (one table), and serve."""
import argparse
import sys

from .. import checks, flags
from .common import (Cfg, box_or_mask, caption_temperature_arg, load_pipeline, lora_args, memory_args,
                     native_size_arg, number, overrides, parse_size, position, progress)


def sampling_args(p, output, seed=None):
    """The flags every sampling command takes (``seed``: the default seed; None draws one)."""
    p.add_argument('--model', help='pipeline folder (default: the emoji model shipped in the package)')
    p.add_argument('-o', '--output', default=output, help='output image (default: %(default)s)')
    p.add_argument('--seed', type=number, default=seed, help=f"random seed (default: {seed if seed is not None else 'random'})")
    p.add_argument('--steps', type=number, help="sampling steps (default: the model's)")
    p.add_argument('--cfg', action=Cfg, help="classifier-free guidance scale, or START END for a linear "
                                             "schedule over the steps (default: the model's)")
    p.add_argument('--renoise', metavar='RULE', help="which tokens go back to noise after each step: random "
                   "(published), confidence (the least probable) or halton (a spread order) (default: the model's)")
    caption_temperature_arg(p)
    native_size_arg(p)
    p.add_argument('--negative-prompt', default='', help='what the image should not be')
    p.add_argument('--grid', action='store_true', help='save all images as one grid')
    p.add_argument('--device', help='cpu, cuda, ... (default: cpu)')
    memory_args(p)
    lora_args(p)


def parse_generate(p):
    p.add_argument('prompt', nargs='+', help='one or more prompts')
    sampling_args(p, 'paella.png')
    p.add_argument('--num-images', type=number, default=1, help='images per prompt')
    p.add_argument('--labels', action='store_true', help='with --grid: write each prompt under its image')
    p.add_argument('--dtype', default='auto', help="generator weights: auto (bf16 where native), fp32 or bf16")
    p.add_argument('--compile', action='store_true', help='torch.compile the generator (slow first call)')
    p.add_argument('--timings', action='store_true', help='print where the time went')


def cmd_generate(args):
    import time
    t0 = time.perf_counter()
    pipe = load_pipeline(args, dtype=args.dtype)
    if args.compile:
        pipe.compile()
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    t1, timings = time.perf_counter(), {}
    bar = progress(pipe.settings_with(overrides(args)).steps, 'generate')
    images = pipe(prompts, negative_prompt=args.negative_prompt, seed=args.seed, timings=timings, callback=bar,
                  **overrides(args))
    t2 = time.perf_counter()
    from ..images import save_images
    for p in save_images(images, args.output, args.grid, prompts if args.labels else None):
        print(p)
    if args.timings:
        parts = {'loading': t1 - t0, **timings, 'saving': time.perf_counter() - t2}
        print(' '.join(f'{k} {v:.2f} s' for k, v in parts.items()), file=sys.stderr)


IMAGE = ('image', 'input image (PNG or JPEG)')
PROMPT = ('prompt', 'prompt')

# mode -> (help, positional arguments, extra flags: (names, add_argument options), the Pipeline call)
MODES = {
    'variations': ('variations of an image', [IMAGE], [
        (['-n'], dict(type=number, default=4, help='number of variations (default: %(default)s)')),
        (['--prompt'], dict(default='', help='steer the variations toward a prompt (default: none)')),
        (['--strength'], dict(type=float, default=0.6,
                              help='models without CLIP: fraction of tokens re-noised (default: %(default)s)'))],
        lambda pipe, a, kw: pipe.variations(a.image, a.n, a.prompt, a.strength, **kw)),
    'inpaint': ('regenerate the masked part of an image',
                [IMAGE, ('mask', 'mask image of the same size: white = regenerate'), PROMPT], [
        (['--dilate'], dict(type=number, default=0, help='grow the mask by this many tokens (default: 0)'))],
        lambda pipe, a, kw: pipe.inpaint(a.image, a.mask, a.prompt, dilate=a.dilate, **kw)),
    'outpaint': ('extend an image to a larger canvas', [IMAGE, PROMPT], [
        (['--size'], dict(type=parse_size, required=True, help='canvas WIDTHxHEIGHT in pixels, e.g. 512x256')),
        (['--position'], dict(type=position, default='center', help="where the image goes: center, left, right, "
                              "top, bottom, top-left, ... or X,Y (default: center)"))],
        lambda pipe, a, kw: pipe.outpaint(a.image, a.prompt, a.size, a.position, **kw)),
    'interpolate': ('images between two prompts', [('prompt_a', 'first prompt'), ('prompt_b', 'last prompt')], [
        (['-n'], dict(type=number, default=5, help='number of images (default: %(default)s)')),
        (['--method'], dict(choices=['linear', 'slerp'], default='linear'))],
        lambda pipe, a, kw: pipe.interpolate(a.prompt_a, a.prompt_b, a.n, a.method, **kw)),
    'edit': ('structural editing: move an image toward a prompt', [IMAGE, PROMPT], [
        (['--strength'], dict(type=float, default=0.5, help='0 = unchanged ... 1 = new image (default: %(default)s)'))],
        lambda pipe, a, kw: pipe.edit(a.image, a.prompt, a.strength, **kw)),
    'regional': ('one image, several prompts in regions', [], [
        (['--region'], dict(nargs=2, action='append', metavar=('PROMPT', 'BOX_OR_MASK'), default=[],
                            help='a prompt and its region: X0,Y0,X1,Y1 in pixels or a mask image (repeatable)')),
        (['--size'], dict(type=parse_size, help="canvas WIDTHxHEIGHT (default: the model's)")),
        (['--background'], dict(default='', help='prompt outside every region (default: empty)')),
        (['--num-images'], dict(type=number, default=1))],
        lambda pipe, a, kw: pipe.regional(a.regions, a.size, a.background, num_images=a.num_images, **kw)),
}


def check_sampling(p, args):
    """The flags of generate and the editing modes, checked before the model loads, in the sentences of
    `paella.checks` that the Python API uses: a mistake is one line and exit status 2."""
    from ..images import load_image
    caps, mode = checks.Caps(), args.command
    try:
        checks.device(args.device)
        args.seed = checks.seed(args.seed)          # cleaned as the API cleans them: '2.0' is 2
        if args.steps is not None:
            args.steps = checks.integer(args.steps, 'steps', 1, caps.steps)
        if args.renoise is not None:
            checks.choice(args.renoise, 'renoise', checks.RENOISE_RULES)
        checks.text(args.negative_prompt, 'negative_prompt', caps.prompt)
        checks.output_path(args.output)
        for name in ('prompt', 'prompt_a', 'prompt_b', 'background'):
            value = getattr(args, name, None)
            for text in value if isinstance(value, list) else [] if value is None else [value]:
                checks.text(text, name, caps.prompt)
        if mode == 'generate':
            from ..speed import resolve_dtype
            resolve_dtype(args.dtype, 'cpu')
            args.num_images = checks.count(args.num_images, 'num_images', caps.images)
            checks.count(len(args.prompt) * args.num_images, 'the number of images', caps.images)
        if mode in ('variations', 'interpolate'):
            args.n = checks.count(args.n, 'n', caps.images, lo=2 if mode == 'interpolate' else 1)
        if mode in ('variations', 'edit'):
            checks.number(args.strength, 'strength', 0, 1)
        if mode == 'inpaint':
            args.dilate = checks.integer(args.dilate, 'dilate', 0, caps.side)
        if mode in ('outpaint', 'regional') and args.size is not None:
            checks.canvas(args.size, caps)
        if mode == 'regional':
            checks.count(len(args.region), 'the number of regions', caps.regions)
            args.num_images = checks.count(args.num_images, 'num_images', caps.images)
            args.regions = [(checks.text(prompt, 'a region prompt', caps.prompt), box_or_mask(region))
                            for prompt, region in args.region]
            for _, region in args.regions:
                for v in region if isinstance(region, tuple) else ():
                    checks.number(v, 'a box coordinate', 0, caps.side)
        for name in ('image', 'mask'):
            if getattr(args, name, None) is not None:
                load_image(getattr(args, name), name)
    except (TypeError, ValueError) as e:
        p.error(str(e))


def parse_mode(p):
    mode = p.prog.split()[-1]
    _, inputs, extra, _ = MODES[mode]
    for name, help_ in inputs:
        p.add_argument(name, help=help_)
    # interpolate: every frame shares one seed, a fixed one unless --seed says otherwise
    sampling_args(p, f'{mode}.png', seed=0 if mode == 'interpolate' else None)
    for names, options in extra:
        p.add_argument(*names, **options)


def cmd_mode(args):
    from ..images import save_images
    pipe = load_pipeline(args)
    images = MODES[args.command][3](pipe, args, dict(negative_prompt=args.negative_prompt, seed=args.seed,
                                                      callback=progress(None, args.command), **overrides(args)))
    for path in save_images(images, args.output, args.grid, cols=min(len(images), 8)):
        print(path)


def port(text):
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {text!r}")
    return int(text)


def parse_serve(p):
    from ..serve import HOST, Limits
    p.add_argument('--model', help='pipeline folder (default: the emoji model shipped in the package)')
    p.add_argument('--host', default=HOST,
                   help='address to listen on (default: %(default)s, this machine only; 0.0.0.0: every interface)')
    p.add_argument('--port', type=port, default=7860)
    p.add_argument('--allowed-hosts', nargs='+', default=[], metavar='NAME',
                   help='host names clients may use besides loopback ones (the name a proxy forwards; * for any)')
    p.add_argument('--device', help='cpu, cuda, ... (default: cpu)')
    p.add_argument('--api-only', action='store_true', help='the /v1 HTTP API without the web app')
    native_size_arg(p)
    memory_args(p)
    lora_args(p)
    flags.add_config(p, Limits)


def check_serve(p, args):
    """Every setting checked before the model loads: a wrong one is a usage error (exit 2)."""
    from ..serve import Limits, allowed_hosts, check_listen_address
    if not args.api_only:
        from importlib.util import find_spec
        if find_spec('gradio') is None:
            p.error("the web app needs Gradio: pip install 'paella[web]' (in a clone: pip install -e '.[web]'), "
                    "or serve the HTTP API alone with --api-only")
    try:
        args.limits = flags.read_config(Limits, args)
    except ValueError as e:
        p.error(f"--{str(e).replace('_', '-', 1)}")
    try:
        check_listen_address(args.host, args.port)
        args.hosts = allowed_hosts(args.host, args.allowed_hosts)
    except ValueError as e:
        p.error(str(e))


def cmd_serve(args):
    from ..serve import is_loopback, serve, url_host
    pipe = load_pipeline(args)
    if '*' in args.hosts:
        print("paella serve: --allowed-hosts '*': any Host header is accepted, so a web page could reach "
              "this server through DNS rebinding; use it only behind a proxy that checks the name",
              file=sys.stderr)
    if not is_loopback(args.host):
        print(f"paella serve: listening on {args.host}: reachable from other machines, with no login; "
              f"put it behind a proxy with TLS and a password (docs/serve.md). Host names "
              f"accepted: {', '.join(args.hosts)}", file=sys.stderr)
    base = f"http://{url_host(args.host)}:{args.port}"
    web = '' if args.api_only else f"{base}/ (web app), "
    print(f"paella serve: {web}{base}/v1/generate, /v1/edit (API)", flush=True)
    serve(pipe, args.host, args.port, args.limits, with_web=not args.api_only, hosts=args.hosts)
