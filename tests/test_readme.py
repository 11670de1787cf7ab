"""Every `paella` command the README shows runs. For each subcommand in the README's ```bash blocks, its
first occurrence runs in-process (`paella.cli.main`), in a scratch folder and in README order (the training
block is one chain: data -> train-vq -> preencode -> train -> assemble), with tiny stand-ins where the
README names something big: official checkpoints (the published tiny models of the test fixtures), ByT5-XL
and CLIP-H (tiny random ones), the whole emoji set (8 emoji), thousands of steps (2). What each command
writes (``-o``, ``--out``, the output folder or file) must then exist."""
import json
import re
import shlex

import pytest
import torch
from conftest import REPO, load_fixture
from PIL import Image

# Commands the README shows that CI cannot run, and why.
NOT_RUN = {
    'torchrun train': 'several processes on the README\'s shards; tests/test_train.py runs torchrun '
                      '--nproc_per_node=2 (gloo, DDP and FSDP) on tiny data',
}
FAST = {'--steps': ['2']}
TRAIN = {'--steps': ['2'], '--batch-size': ['4'], '--preset': ['tiny'], '--tensorboard': ['false']}
# subcommand -> flags set in place of the README's values (tiny settings)
TINY = {
    **{mode: FAST for mode in ('generate', 'variations', 'inpaint', 'outpaint', 'interpolate', 'edit', 'regional')},
    'convert': {'--preset': ['tiny']},
    'convert-v3': {'--preset': ['tiny'], '--byt5': ['{t5}'], '--clip': ['{clip}']},
    'data': {'--limit': ['8']},
    'train-vq': TRAIN,
    'train': TRAIN,
    'finetune': {'--data': ['{real}'], '--steps': ['2'], '--batch-size': ['4'], '--tensorboard': ['false']},
    'eval': {'--data': ['{real}'], '--n': ['6'], '--steps': ['2'], '--seeds': ['2']},
}


def readme_commands():
    """[argv] of every command line in the README's ```bash blocks (continuations joined, comments dropped)."""
    blocks = re.findall(r'```bash\n(.*?)```', (REPO / 'README.md').read_text(), re.DOTALL)
    return [argv for block in blocks for line in block.replace('\\\n', ' ').splitlines()
            if (argv := shlex.split(line, comments=True))]


def first_occurrences():
    """{subcommand: its first argv (without 'paella')}; torchrun lines as 'torchrun SUBCOMMAND'."""
    first = {}
    for argv in readme_commands():
        if argv[0] == 'paella':
            first.setdefault(argv[1], argv[1:])
        elif 'paella.cli' in argv:
            first.setdefault(f"{argv[0]} {argv[argv.index('paella.cli') + 1]}", argv)
    return first


COMMANDS = first_occurrences()


def with_flags(argv, flags):
    """argv with each flag's value(s) replaced (or the flag added)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in flags:
            i += 1
            while i < len(argv) and not argv[i].startswith('--'):
                i += 1
        else:
            out.append(argv[i])
            i += 1
    return out + [x for flag, values in flags.items() for x in (flag, *values)]


def outputs(argv):
    """What the README's command says it writes: the -o / --out value, else the output positional."""
    for flag in ('-o', '--output', '--out'):
        if flag in argv:
            return [argv[argv.index(flag) + 1]]
    positional = {'convert': 2, 'convert-v3': 1, 'assemble': 1, 'preencode': 2, 'restored-pairs': 2}
    if argv[0] == 'captions':
        return [f'{argv[1]}/captions/captions.safetensors']
    return [argv[positional[argv[0]]]] if argv[0] in positional else []


@pytest.fixture(scope='module')
def workspace(tmp_path_factory, tiny_t5_dir, tiny_clip_dir):
    """The scratch folder the commands run in, with the files the README takes as given."""
    from test_evaluate import real_folder
    folder = tmp_path_factory.mktemp('readme')
    for name, file in [('paella_tiny', 'paella_v3.pt'), ('vqgan_f4_tiny', 'vqgan_f4.pt'), ('prior_tiny', 'prior_v1.pt')]:
        torch.save(load_fixture(name)[0], folder / file)
    mask = Image.new('L', (256, 256))                   # the shipped model's canvas
    mask.paste(255, (128, 0, 256, 256))
    mask.save(folder / 'mask.png')
    real = real_folder(folder / 'real', {'red apple', 'fire engine', 'pizza', 'rocket', 'ghost', 'banana'})
    return folder, {'t5': str(tiny_t5_dir), 'clip': str(tiny_clip_dir), 'real': str(real)}


@pytest.fixture(scope='module')
def shipped_once(hf_offline):
    """The shipped pipeline loads once for all the README's drawing commands (loading is tested elsewhere)."""
    from paella.pipeline import Pipeline
    load, cache = Pipeline.from_pretrained.__func__, {}

    def from_pretrained(cls, folder=None, **kwargs):
        if folder is not None:
            return load(cls, folder, **kwargs)
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            cache[key] = load(cls, None, **kwargs)
        return cache[key]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Pipeline, 'from_pretrained', classmethod(from_pretrained))
        yield


def test_the_readme_shows_every_command_family():
    assert {'generate', 'inpaint', 'regional', 'serve', 'convert', 'info', 'convert-v3', 'data', 'train-vq',
            'preencode', 'train', 'assemble', 'captions', 'restored-pairs', 'eval', 'finetune'} <= set(COMMANDS)
    assert set(NOT_RUN) <= set(COMMANDS), 'a command listed as not run is no longer in the README'


@pytest.mark.parametrize('name', [n for n in COMMANDS if n not in NOT_RUN and n != 'serve'])
def test_readme_command_runs(name, workspace, shipped_once, monkeypatch, capsys):
    from paella.cli import main
    folder, stand_ins = workspace
    monkeypatch.chdir(folder)
    readme = COMMANDS[name]
    tiny = {flag: [v.format(**stand_ins) for v in values] for flag, values in TINY.get(name, {}).items()}
    assert main(with_flags(readme, tiny)) == 0, f"paella {shlex.join(readme)}"
    out = capsys.readouterr().out
    for path in outputs(readme):
        assert (folder / path).exists(), f"paella {name} did not write {path}"
    if name == 'info':
        assert json.loads(out)['parameters'] == 412_672             # the converted tiny paella_v3.pt
    if name == 'eval':
        *seeds, summary = [json.loads(line) for line in out.splitlines()]
        assert [r['seed'] for r in seeds] == [0, 1] and summary['seeds'] == 2


def test_readme_serve_command_parses_and_starts(workspace, shipped_once, monkeypatch, capsys):
    """`paella serve` blocks until stopped: here the server itself is stubbed out, after every flag is read."""
    import paella.serve
    from paella.cli import main
    started = []
    monkeypatch.setattr(paella.serve, 'serve', lambda pipe, host, port, limits, **kw: started.append((host, port, kw)))
    assert main(COMMANDS['serve']) == 0
    host, port, kw = started[0]
    assert (host, port, kw['with_web']) == ('127.0.0.1', 7860, True)
    assert 'http://127.0.0.1:7860/ (web app)' in capsys.readouterr().out


def test_eval_without_data_leaves_no_temporary_folder(shipped_once, monkeypatch, capsys, tmp_path):
    """`paella eval` without --data builds the real renders in a temporary folder: nothing of it is left,
    after two runs, after a run that fails while building, and after a caller that stops early."""
    import tempfile
    import paella_openmoji.dataset
    from paella_openmoji import eval_lines
    from test_evaluate import real_folder
    from paella.cli import main
    from paella.pipeline import Pipeline
    scratch = tmp_path / 'tmp'
    scratch.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(scratch))        # what TMPDIR sets
    built = []

    def build(out, size):                                          # 6 emoji instead of all of them
        built.append((out, size))
        return real_folder(out, {'red apple', 'fire engine', 'pizza', 'rocket', 'ghost', 'banana'}, size)
    monkeypatch.setattr(paella_openmoji.dataset, 'build', build)
    for _ in range(2):
        assert main(['eval', '--n', '6', '--steps', '2']) == 0
        assert json.loads(capsys.readouterr().out)['emoji'] == 6
    # the 64 px renders the tokens come from (the 256 px ones the pictures are measured against are rendered
    # in memory, as the report asks for them)
    assert [size for _, size in built] == [64, 64] and all(p.is_relative_to(scratch) for p, _ in built)
    assert list(scratch.iterdir()) == []

    def broken(out, size):
        build(out, size)
        raise ValueError('the renderer failed')
    monkeypatch.setattr(paella_openmoji.dataset, 'build', broken)
    assert main(['eval', '--n', '6', '--steps', '2']) == 2
    assert 'the renderer failed' in capsys.readouterr().err and list(scratch.iterdir()) == []

    monkeypatch.setattr(paella_openmoji.dataset, 'build', build)
    lines = eval_lines(Pipeline.from_pretrained(), None, n=6, seeds=2, steps=2)
    next(lines)                                                    # the first seed's line, then stop
    assert len(list(scratch.iterdir())) == 1
    lines.close()
    assert list(scratch.iterdir()) == []
