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


def main(argv=None):
    parser = argparse.ArgumentParser(prog='paella', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)

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

    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError
    try:
        args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"paella {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
