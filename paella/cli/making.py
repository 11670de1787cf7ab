"""Commands that make models and data: info / convert / convert-v3 / assemble / captions, preencode,
restored-pairs, train / train-vq / train-prior, and the emoji recipe's data and eval."""
import argparse
import json

from .. import flags
from ..checks import RENOISE_RULES
from .common import (Cfg, caption_temperature_arg, load_pipeline, lora_args, native_size_arg, overrides, positive,
                     print_skipped)


def checkpoint_args(p):
    p.add_argument('checkpoint', help='model folder, .safetensors file or official .pt file')
    p.add_argument('--model', choices=['paella', 'vqgan', 'prior'],
                   help='model type (detected from the weights by default)')
    p.add_argument('--preset', help='size preset for files without a config (default: v3 / f4 / v1)')


def load_model(args):
    from ..checkpoint import model_type_of
    from ..model import Paella
    from ..prior import PriorModel
    from ..vq import VQModel
    kind = args.model or model_type_of(args.checkpoint)
    model = {'paella': Paella, 'vqgan': VQModel, 'prior': PriorModel}[kind]
    return model.from_pretrained(args.checkpoint, preset=args.preset)


def cmd_info(args):
    from dataclasses import asdict
    model = load_model(args)
    print(json.dumps({'model_type': model.model_type, 'parameters': model.num_parameters(),
                      'config': asdict(model.config)}, indent=2))


def cmd_convert(args):
    model = load_model(args)
    folder = model.save_pretrained(args.out)
    print(f"wrote {model.model_type} ({model.num_parameters():,} parameters) to {folder}/")


def parse_convert(p):
    checkpoint_args(p)
    if p.prog.endswith(' convert'):
        p.add_argument('out', help='output folder: model.safetensors + config.json')


def parse_convert_v3(p):
    p.add_argument('out', help='output pipeline folder')
    p.add_argument('--paella', required=True, help='paella_v3.pt')
    p.add_argument('--vqgan', required=True, help='vqgan_f4.pt')
    p.add_argument('--prior', required=True, help='prior_v1.pt')
    p.add_argument('--byt5', default='google/byt5-xl', help='ByT5 name or local folder (default: %(default)s)')
    p.add_argument('--clip', default='laion/CLIP-ViT-H-14-laion2B-s32B-b79K',
                   help='CLIP (transformers format) name or local folder (default: %(default)s)')
    p.add_argument('--preset', help=argparse.SUPPRESS)      # tests: tiny models of the same architecture


def cmd_convert_v3(args):
    import torch
    from ..pipeline import Pipeline
    # float32, the official weights as they are: bfloat16 is a choice made when loading, on the machine
    # that runs it (Pipeline.from_pretrained's dtype), not one baked into the folder. Low memory: the
    # encoders are only checked (ByT5's embedding, CLIP's config), and the prior is read when it is saved.
    pipe = Pipeline.v3(args.paella, args.vqgan, args.prior, byt5=args.byt5, clip=args.clip, preset=args.preset,
                       dtype=torch.float32, low_memory=True, cache=False)
    print(f"wrote the Paella v3 pipeline to {pipe.save_pretrained(args.out)}/")


def parse_assemble(p):
    from ..pipeline import Settings
    p.add_argument('out', help='output pipeline folder')
    p.add_argument('--generator', required=True, help='generator model folder (e.g. runs/gen/ema)')
    p.add_argument('--vqgan', required=True, help='VQGAN model folder')
    p.add_argument('--text-encoder', default='minilm', help="minilm, minilm:<folder> or byt5:<path> (default: minilm)")
    p.add_argument('--pad-to', type=int, default=24, help='text tokens per prompt, as in training (default: 24)')
    p.add_argument('--image-size', type=int, help="the canvas side in pixels (default: 16 tokens a side: 64 px "
                   "with 4 px a token, 256 with a super-resolving VQGAN's 16)")
    flags.add_dotted(p, ['--settings'], Settings, 'sampling settings, e.g. --settings.steps 12 --settings.cfg 3')
    p.add_argument('--half', action='store_true', help='store the weights in float16')
    lora_args(p, 'a LoRA adapter folder (paella finetune) to build into the generator at a scale (default 1); '
                 'repeat for several')


def cmd_assemble(args):
    import torch
    from ..pipeline import Pipeline
    from ..pipeline import Settings
    settings = flags.dotted(args, 'settings', Settings)
    pipe = Pipeline.assemble(args.generator, args.vqgan, args.text_encoder, args.pad_to, args.image_size, **settings)
    for path, scale in args.lora:
        pipe.load_lora(path, scale)
    pipe.fuse_lora()
    pipe.save_pretrained(args.out, dtype=torch.float16 if args.half else None)
    print(f"wrote the pipeline to {args.out}/")


def parse_preencode(p):
    p.add_argument('data', help="image folder with captions, or webdataset shards ('in/{000..099}.tar')")
    p.add_argument('out', help='output .safetensors file; for shards an output folder of shards')
    p.add_argument('--vqgan', required=True, help='VQGAN model folder')
    p.add_argument('--text-encoder', default='minilm', help="minilm, byt5:<path> or none (default: minilm)")
    p.add_argument('--clip', help='CLIP model (transformers format) for clip_text / clip_image')
    p.add_argument('--image-size', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--device')
    p.epilog = ("Shards on N processes (each its share of the input shards; a rerun skips finished ones): "
                "torchrun --nproc_per_node=N -m paella.cli preencode 'in/{000..099}.tar' out/ ... "
                "(or srun: SLURM_PROCID / SLURM_NTASKS)")


def process_of():
    """(rank, world, local rank) under torchrun or SLURM's srun; (0, 1, 0) otherwise."""
    import os

    def env(*names, default):
        return int(next((os.environ[n] for n in names if n in os.environ), default))
    return (env('RANK', 'SLURM_PROCID', default=0), env('WORLD_SIZE', 'SLURM_NTASKS', default=1),
            env('LOCAL_RANK', 'SLURM_LOCALID', default=0))


def cmd_preencode(args):
    import torch
    from ..conditioning import clip_encoder, encoder_spec, load_text_encoder
    from ..data import is_shards
    from ..train import preencode
    from ..vq import VQModel
    spec = encoder_spec(args.text_encoder)            # a typo is an error before any model loads
    if is_shards(args.data) and args.device and args.device.startswith('cuda') and ':' not in args.device:
        args.device = f'cuda:{process_of()[2]}'       # one GPU per process
    vq = VQModel.from_pretrained(args.vqgan, device=args.device, dtype=torch.float32)   # also half-saved ones
    text = None if spec is None else load_text_encoder(spec, args.device)
    clip = clip_encoder(args.clip, device=args.device) if args.clip else None
    if is_shards(args.data):
        from ..train.prepare import preencode_shards
        rank, world, _ = process_of()
        shards, n, skipped = preencode_shards(args.data, args.out, vq, text, clip, args.image_size, args.batch_size,
                                              args.device, rank, world)
        print_skipped(skipped)
        print(f"process {rank} of {world}: wrote {shards} shards, {n} samples to {args.out}/ ({len(skipped)} skipped)")
        return
    n, skipped = preencode(args.data, args.out, vq, text, clip, args.image_size, args.batch_size, args.device)
    print_skipped(skipped)
    print(f"wrote {n} samples to {args.out} ({len(skipped)} skipped)")


def parse_restored_pairs(p):
    p.add_argument('data', help='image folder with captions')
    p.add_argument('out', help='output .safetensors file')
    p.add_argument('--model', help='pipeline folder (default: the shipped emoji model)')
    p.add_argument('--strength', type=float, default=1.0,
                   help="noise level the tokens are restored from (1: generated from the caption; default 1)")
    p.add_argument('--copies', type=int, default=1, help='restored rows per image, besides its own tokens (default 1)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--image-size', type=int, help="side of the stored images (default: the model's canvas); a "
                   "multiple of it pairs each image's tokens with the larger image (a super-resolving decoder's data)")
    p.add_argument('--device')


def cmd_restored_pairs(args):
    from ..train import restored_pairs
    pipe = load_pipeline(args)
    n, skipped = restored_pairs(args.data, args.out, pipe, args.strength, args.copies, args.seed, args.batch_size,
                                args.image_size)
    print_skipped(skipped)
    print(f"wrote {n} token/image pairs to {args.out} ({len(skipped)} skipped)")


TRAIN = {'train': 'generator', 'train-vq': 'vqgan', 'train-prior': 'prior', 'finetune': 'lora'}


def parse_train(p):
    from ..data import webdataset_filter
    from ..train import RECIPES
    recipe = RECIPES[TRAIN[p.prog.split()[-1]]]
    flags.add_config(p, recipe.config, nested={'model': recipe.model, 'filters': webdataset_filter},
                     aliases={'model': ['--model-config']})
    p.epilog = f"Several processes: torchrun --nproc_per_node=N -m paella.cli {p.prog.split()[-1]} ..."


def cmd_train(args):
    import torch.distributed as dist
    from ..data import webdataset_filter
    from ..train import RECIPES, train
    recipe = RECIPES[TRAIN[args.command]]
    cfg = flags.read_config(recipe.config, args, nested={'model': recipe.model, 'filters': webdataset_filter})
    train(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()


def parse_eval(p):
    p.add_argument('--model', help='pipeline folder (default: the shipped emoji model)')
    p.add_argument('--data', help='real renders (a paella data folder; default: built on the fly)')
    p.add_argument('--data-large', metavar='DIR', help="a model drawing larger than --data's renders (a super-"
                   "resolving decoder): the renders at its size (default: built on the fly)")
    p.add_argument('--n', type=int, help='emoji scored (default 200; with --style: the 50 held-out concepts)')
    p.add_argument('--seed', type=int, default=0, help='picks the scored emoji and seeds the samples')
    p.add_argument('--seeds', type=positive, default=1, metavar='K',
                   help='evaluate seeds SEED .. SEED+K-1: one report line each, then mean / min / max')
    p.add_argument('--steps', type=int)
    p.add_argument('--cfg', action=Cfg, help="guidance scale or START END (default: the model's)")
    p.add_argument('--renoise', metavar='RULE', choices=RENOISE_RULES,
                   help=f"re-noising rule: {', '.join(RENOISE_RULES)} (default: the model's)")
    caption_temperature_arg(p)
    native_size_arg(p)
    p.add_argument('--regional', type=int, metavar='TRIALS',
                   help='instead: the regional-prompt check over this many seeded trials (e.g. 20)')
    p.add_argument('--style', choices=['twemoji'],
                   help="instead: the style report of the held-out concepts ('<name>, twemoji style' drawn "
                        "nearer to the Twemoji render than to the OpenMoji one; `paella data twemoji`)")
    p.add_argument('--freeform', action='store_true',
                   help='instead: the free-form report (prompts as people type them: clean rate, intended '
                        'emoji, diversity of 8 images per generic prompt)')
    p.add_argument('--device', help='cpu, cuda, ... (default: cpu)')
    lora_args(p)


def cmd_eval(args):
    from paella_openmoji import HELD_OUT, eval_lines, style_report
    if sum(map(bool, (args.style, args.regional, args.freeform))) > 1:
        raise ValueError('--style, --regional and --freeform are different reports: give one')
    pipe = load_pipeline(args)
    if args.freeform:
        from paella_openmoji import freeform
        lines = freeform.lines(pipe, args.data, args.seed, args.seeds, 200 if args.n is None else args.n,
                               **overrides(args))
    elif args.style:
        lines = style_report(pipe, args.data, args.seed, args.seeds, args.style,
                             HELD_OUT if args.n is None else args.n, **overrides(args))
    else:
        lines = eval_lines(pipe, args.data, 200 if args.n is None else args.n, args.seed, args.seeds, args.regional,
                           args.data_large, **overrides(args))
    for line in lines:
        print(line, flush=True)


def parse_captions(p):
    p.add_argument('model', help='pipeline folder: captions/ is written into it and pipeline.json gets the temperature')
    p.add_argument('--data', required=True, help="the generator's training folder (metadata.jsonl): every caption "
                   "is a key, pointing to its image's first caption")
    p.add_argument('--temperature', type=float, default=0.04,
                   help='caption_temperature: 0 draws every unseen prompt as its nearest caption; higher spreads a '
                        'generic prompt over more of them (default: %(default)s)')


def cmd_captions(args):
    from pathlib import Path
    from .. import checks
    from ..captions import Captions, folder_pairs
    from ..checkpoint import atomic_write
    from ..conditioning import load_text_encoder
    from ..settings import PIPELINE_NAME, read_meta
    path = Path(args.model) / PIPELINE_NAME
    temperature = checks.number(args.temperature, 'temperature', 0, 10)
    encoder = load_text_encoder(read_meta(path)['text_encoder'])
    captions = Captions.build(encoder, folder_pairs(args.data))
    folder = captions.save_pretrained(args.model)
    meta = json.loads(path.read_text())
    meta['settings']['caption_temperature'] = temperature
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + '\n'))
    print(f"wrote {len(captions.key_texts)} captions pointing to {len(captions.targets)} targets to {folder}/; "
          f"caption_temperature {temperature}")


def parse_data(p):
    p.add_argument('name', choices=['openmoji', 'twemoji', 'icon'],
                   help="openmoji: OpenMoji SVGs with Unicode names; twemoji: the LoRA style example, Twemoji "
                        "renders captioned '<name>, twemoji style' beside the same emoji's OpenMoji rows; icon: "
                        "the LoRA concept example, a Font Awesome icon in a few colours beside related emoji")
    p.add_argument('--out', required=True, help='output image folder')
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--skin-tones', action='store_true', help='keep the skin-tone variants too')
    p.add_argument('--aliases', action='store_true',
                   help="extra caption rows from the emoji package's short names (eval paraphrases excluded)")
    p.add_argument('--keywords', nargs='+', metavar='JSON', default=(),
                   help='extra caption rows from CLDR annotation files (npm cldr-annotations-full: '
                        'annotations/en/annotations.json; eval paraphrases excluded)')
    p.add_argument('--name-rows', type=int, default=1, metavar='N',
                   help="write each name row N times (the names' share beside many extra captions)")
    p.add_argument('--limit', type=int, help='only the first N emoji')
    p.add_argument('--n', type=positive, metavar='N',
                   help="twemoji (required): how many style concepts (a smaller set is part of every larger one; "
                        "none is a concept `paella eval --style twemoji` scores); icon: how many renders (6)")
    p.add_argument('--no-base-rows', dest='base_rows', action='store_false',
                   help="twemoji: leave out the OpenMoji rows captioned with the plain names")
    p.add_argument('--icon', help="icon: a solid Font Awesome Free icon's name (default kiwi-bird; pip install "
                                  "fontawesomefree==6.6.0)")
    p.add_argument('--caption', help="icon: the renders' caption (default: the icon's name and 'icon', "
                                     "'kiwi bird icon')")
    p.add_argument('--keep', nargs='+', metavar='NAME',
                   help="icon: OpenMoji emoji (by name) added under their names so that the adapter leaves them "
                        "as they are (default for kiwi-bird: 'kiwi fruit' 'bird')")


def cmd_data(args):
    from paella_openmoji import ATTRIBUTION, build_dataset
    given = {'--skin-tones': args.skin_tones, '--aliases': args.aliases, '--keywords': bool(args.keywords),
             '--name-rows': args.name_rows != 1, '--limit': args.limit is not None,
             '--n': args.n is not None, '--no-base-rows': not args.base_rows, '--icon': args.icon is not None,
             '--caption': args.caption is not None, '--keep': args.keep is not None}
    own = {'openmoji': ('--skin-tones', '--aliases', '--keywords', '--name-rows', '--limit'),     # each source's flags
           'twemoji': ('--n', '--no-base-rows'), 'icon': ('--n', '--icon', '--caption', '--keep')}[args.name]
    wrong = [flag for flag, on in given.items() if on and flag not in own]
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: not a flag of `paella data {args.name}`")
    if args.name == 'twemoji':
        return data_twemoji(args)
    if args.name == 'icon':
        return data_icon(args)
    n = build_dataset(args.out, args.size, skin_tones=args.skin_tones, limit=args.limit, aliases=args.aliases,
                      keywords=args.keywords, name_rows=args.name_rows)
    print(f"wrote {n} emoji at {args.size}x{args.size} to {args.out}/ (metadata.jsonl)\n{ATTRIBUTION}")


def data_icon(args):
    from paella_openmoji import ATTRIBUTION, FONTAWESOME_ATTRIBUTION, build_concept_set
    n, kept = build_concept_set(args.out, args.icon or 'kiwi-bird', args.caption, args.n or 6, args.size,
                                keep=args.keep)
    licences = FONTAWESOME_ATTRIBUTION + (f"\n{ATTRIBUTION}" if kept else '')
    print(f"wrote {n} renders of the {args.icon or 'kiwi-bird'} icon and {kept} OpenMoji rows at {args.size}x"
          f"{args.size} to {args.out}/ (metadata.jsonl)\n{licences}")


def data_twemoji(args):
    from paella_openmoji import ATTRIBUTION, HELD_OUT, TWEMOJI_ATTRIBUTION, build_style_set
    if args.n is None:
        raise ValueError('twemoji needs --n N, the number of style concepts (e.g. 100)')
    n = build_style_set(args.out, args.n, args.size, base_rows=args.base_rows)
    rows = f"{n} Twemoji renders{' and their OpenMoji rows' if args.base_rows else ''}"
    print(f"wrote {rows} at {args.size}x{args.size} to {args.out}/ (metadata.jsonl); {HELD_OUT} other concepts are "
          f"held out for `paella eval --style twemoji`\n{TWEMOJI_ATTRIBUTION}\n{ATTRIBUTION}")
