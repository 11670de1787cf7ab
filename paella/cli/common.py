"""What several commands share: loading a pipeline, value types for flags, Settings overrides."""
import argparse
import sys

from .. import checks


def memory_args(p):
    """--low-memory / --keep-encoders: `Pipeline.from_pretrained`'s low_memory (default: by the RAM there is)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument('--low-memory', action='store_true', help='one large model in memory at a time: encoders '
                   'read for each prompt, embeddings cached on disk (default where RAM is short)')
    g.add_argument('--keep-encoders', action='store_true', help='load every model at once and keep it')


def lora_args(p, help='a LoRA adapter folder (paella finetune) at a scale (default 1); repeat for several'):
    p.add_argument('--lora', action='append', type=lora_spec, default=[], metavar='PATH[:SCALE]', help=help)


def lora_spec(text):
    """'PATH' or 'PATH:SCALE' -> (path, scale), checked before any model loads; a folder whose name ends in
    ':<not a number>' stays a path."""
    from ..lora import check_folder
    path, _, tail = text.rpartition(':')
    try:
        scale = float(tail) if path else None
    except ValueError:
        scale = None
    if scale is None:
        path, scale = text, 1.0
    try:
        scale = checks.number(scale, 'LoRA scale', -100, 100)
        check_folder(path)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path, scale


def load_pipeline(args, **kwargs):
    """The --model pipeline (default: the shipped one) with --low-memory / --keep-encoders and --lora."""
    from ..pipeline import Pipeline
    low = True if getattr(args, 'low_memory', False) else False if getattr(args, 'keep_encoders', False) else None
    pipe = Pipeline.from_pretrained(args.model, device=args.device, low_memory=low,
                                    native=getattr(args, 'native_size', False), **kwargs)
    for path, scale in getattr(args, 'lora', None) or ():
        pipe.load_lora(path, scale)
    return pipe


def print_skipped(skipped):
    for name, why in skipped:
        print(f"skipped {name}: {why}", file=sys.stderr)


class Cfg(argparse.Action):
    """--cfg 3, --cfg 3 1.25 or --cfg 3,1.25: one guidance scale or a (start, end) schedule."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, nargs='+', **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, parse_cfg(','.join(values)))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentError(self, str(e)) from None


def parse_cfg(text):
    """--cfg: one guidance scale, or START,END for a linear schedule over the steps."""
    try:
        values = tuple(float(v) for v in text.split(','))
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected a number or START END such as 3 1.25, got {text!r}")
    try:                                        # nan, inf, -1: the Python API's sentence
        return checks.schedule(values[0] if len(values) == 1 else values, 'cfg', 0, 100)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def number(text):
    """A number as typed ('3' -> 3, '1.5' -> 1.5): whether it is whole and in range is for `paella.checks`
    to say, in the sentence the Python API uses (argparse's own would be "invalid int value")."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def parse_size(text):
    """'512x256' -> (512, 256)."""
    try:
        w, h = (int(v) for v in text.lower().split('x'))
        return w, h
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 512x256, got {text!r}") from None


def box_or_mask(text):
    """'x0,y0,x1,y1' (pixels, whole or not) -> a box; otherwise the path of an existing mask image."""
    from pathlib import Path
    try:
        box = tuple(float(v) for v in text.split(','))
    except ValueError:
        box = ()
    if len(box) == 4:
        return box
    if not Path(text).is_file():
        raise ValueError(f"a region must be a box X0,Y0,X1,Y1 in pixels or a mask image, got {text!r}")
    return text


def position(text):
    """'center', 'top-left', ... or 'X,Y' in pixels."""
    if ',' not in text:
        return text
    try:
        x, y = (int(v) for v in text.split(','))
        return x, y
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected center, left, top-left, ... or X,Y in whole pixels, "
                                         f"got {text!r}") from None


def progress(total, desc):
    """A sampler callback (i, tokens) that draws a progress bar on a terminal (stderr), nothing elsewhere."""
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit='step', leave=False, mininterval=0, disable=not sys.stderr.isatty())
    return lambda i, tokens: bar.update(1)


def caption_temperature(text):
    """--caption-temperature: a number, or 'none' (every prompt as typed)."""
    if text.lower() == 'none':
        return 'none'
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None


def native_size_arg(p):
    p.add_argument('--native-size', action='store_true',
                   help="images at the VQGAN's native size, without its super-resolving stages (the emoji model: "
                        "64 px instead of 256; inputs, masks and canvas sizes then in those pixels)")


def caption_temperature_arg(p):
    p.add_argument('--caption-temperature', type=caption_temperature, metavar='T',
                   help="a model with a retrieval prior (paella captions): how widely an unseen prompt is drawn "
                        "among the training captions near it (0: the nearest; none: every prompt as typed) "
                        "(default: the model's)")


def overrides(args):
    """--steps / --cfg / --renoise / --caption-temperature as Settings overrides, where given."""
    given = (('steps', args.steps), ('cfg', args.cfg), ('renoise_rule', args.renoise),
             ('caption_temperature', args.caption_temperature))
    return {k: None if v == 'none' else v for k, v in given if v is not None}
