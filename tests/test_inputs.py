"""Every input a person can give: one sentence before any work, the same from the CLI and the Python API.

Each row of CASES is one mistake: the sentence expected, the command line that makes it (exit status 2,
one error line, no traceback, no model loaded) and the Python call that makes it (ValueError, or TypeError
for a value of the wrong kind, with the same sentence, before anything is sampled).
"""
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from paella.checkpoint import CheckpointError
from paella.cli import main
from paella.pipeline import Pipeline, default_model_path

SEED_MAX = 2 ** 63 - 1
BOX = (0, 0, 32, 32)


@pytest.fixture(scope='module')
def pipe(hf_offline):
    return Pipeline.from_pretrained()


@pytest.fixture(scope='module')
def apple(tmp_path_factory):
    folder = tmp_path_factory.mktemp('inputs')
    Image.new('RGB', (64, 64), (220, 30, 30)).save(folder / 'apple.png')
    Image.new('1', (20000, 20000)).save(folder / 'huge.png')     # 50 KB on disk, 1.2 GB decoded as RGB
    return folder / 'apple.png'


CASES = [
    # sentence, command line (after `paella`), Python call: (method, args, kwargs, exception)
    ('steps must be between 1 and 1000, got 1000000',
     ['generate', 'x', '--steps', '1000000'], ('__call__', ('x',), dict(steps=10 ** 6), ValueError)),
    ('steps must be a whole number between 1 and 1000, got True',
     None, ('__call__', ('x',), dict(steps=True), TypeError)),
    (f'seed must be a whole number between 0 and {SEED_MAX}, got {2 ** 64}',
     ['generate', 'x', '--seed', str(2 ** 64)], ('__call__', ('x',), dict(seed=2 ** 64), ValueError)),
    ('seed must be a whole number, got 1.5',
     ['generate', 'x', '--seed', '1.5'], ('__call__', ('x',), dict(seed=1.5), ValueError)),
    ('steps must be a whole number, got 2.5',
     ['edit', '{apple}', 'x', '--steps', '2.5'], ('edit', ('{apple}', 'x'), dict(steps=2.5), ValueError)),
    (f"seed must be a whole number between 0 and {SEED_MAX}, got '0'",
     None, ('__call__', ('x',), dict(seed='0'), TypeError)),
    ('num_images must be between 1 and 64, got 0',
     ['generate', 'x', '--num-images', '0'], ('regional', ([('x', BOX)],), dict(num_images=0), ValueError)),
    ('num_images must be between 1 and 64, got 100000', ['generate', 'x', '--num-images', '100000'], None),
    ('num_images must be between 1 and 64, got -1',
     ['regional', '--region', 'x', '1.5,2,30,40', '--num-images', '-1'],       # a float box is a box
     ('regional', ([('x', (1.5, 2, 30, 40))],), dict(num_images=-1), ValueError)),
    ('the number of images must be between 1 and 64, got 65', None, ('__call__', (['x'] * 65,), {}, ValueError)),
    ('prompts must be a text or a list of texts, got None', None, ('__call__', (None,), {}, TypeError)),
    ('prompts must be a text or a list of texts, got 123', None, ('__call__', (123,), {}, TypeError)),
    ('give at least one prompt', None, ('__call__', ([],), {}, ValueError)),
    ('prompt contains characters that are not valid Unicode text',
     None, ('__call__', ('\ud800 apple',), {}, ValueError)),
    ('prompt is 2001 characters long; the limit is 2000',
     ['generate', 'x' * 2001], ('__call__', ('x' * 2001,), {}, ValueError)),
    ("unknown setting 'stepz'", None, ('__call__', ('x',), dict(stepz=3), TypeError)),
    ('cfg must be a number between 0 and 100, got nan',
     ['generate', 'x', '--cfg', 'nan'], ('__call__', ('x',), dict(cfg=float('nan')), ValueError)),
    ('latent_size must be between 1 and 64, got 1000',               # 1024 pixels a side / the VQGAN's 16
     None, ('__call__', ('x',), dict(latent_size=(1000, 1000)), ValueError)),
    ('a box coordinate must be a number between 0 and',
     ['regional', '--region', 'x', 'inf,0,1,1'], ('regional', ([('x', (float('inf'), 0, 1, 1))],), {}, ValueError)),
    ('prompt must be a text, got None', None, ('variations', ('{apple}',), dict(prompt=None), TypeError)),
    ('cfg must be a number or [start, end], got a list of 1', None, ('__call__', ('x',), dict(cfg=(3,)), ValueError)),
    ('temperature must be a number between 0 and 100, got inf',
     None, ('__call__', ('x',), dict(temperature=float('inf')), ValueError)),
    ("output must be one of pil, tokens, got 'png'", None, ('__call__', ('x',), dict(output='png'), ValueError)),
    ('n must be between 1 and 64, got 100000',
     ['variations', '{apple}', '-n', '100000'], ('variations', ('{apple}',), dict(n=10 ** 5), ValueError)),
    ('n must be between 2 and 64, got 1',
     ['interpolate', 'a', 'b', '-n', '1'], ('interpolate', ('a', 'b'), dict(n=1), ValueError)),
    ('the number of regions must be between 1 and 16, got 200',
     ['regional'] + ['--region', 'x', '0,0,32,32'] * 200, ('regional', ([('x', BOX)] * 200,), {}, ValueError)),
    ('size width must be between 1 and 1024, got 100000',
     ['outpaint', '{apple}', 'x', '--size', '100000x64'], ('outpaint', ('{apple}', 'x', (100000, 64)), {}, ValueError)),
    ('size width must be between 1 and 1024, got 100000',
     ['regional', '--region', 'x', '0,0,32,32', '--size', '100000x64'],
     ('regional', ([('x', BOX)],), dict(size=(100000, 64)), ValueError)),
    ("expected center, left, top-left, ... or X,Y in whole pixels, got '10,abc'",
     ['outpaint', '{apple}', 'x', '--size', '128x64', '--position', '10,abc'], None),
    ("position y must be a whole number between -1000000 and 1000000, got 'abc'",
     None, ('outpaint', ('{apple}', 'x', (128, 64)), dict(position=(10, 'abc')), TypeError)),
    ("a region must be a box X0,Y0,X1,Y1 in pixels or a mask image, got 'nope'",
     ['regional', '--region', 'x', 'nope'], None),
    ('strength must be between 0 and 1, got 2',
     ['edit', '{apple}', 'x', '--strength', '2'], ('edit', ('{apple}', 'x'), dict(strength=2), ValueError)),
    ('give an image or a non-empty list of images', None, ('edit', ([], 'x'), {}, ValueError)),
    ('dilate must be between 0 and', ['inpaint', '{apple}', '{apple}', 'x', '--dilate', '-1'],
     ('inpaint', ('{apple}', '{apple}', 'x'), dict(dilate=-1), ValueError)),
    ('does not exist', ['edit', '{dir}/missing.png', 'x'], ('edit', ('{dir}/missing.png', 'x'), {}, ValueError)),
    ('is a directory, not an image file', ['edit', '{dir}', 'x'], ('edit', ('{dir}', 'x'), {}, ValueError)),
    ('is 20000x20000 pixels', ['inpaint', '{apple}', '{huge}', 'x'], ('edit', ('{huge}', 'x'), {}, ValueError)),
    ("device must be cpu, cuda, cuda:N or mps, got 'gpu0'", ['generate', 'x', '--device', 'gpu0'], None),
    ('ends in .txt, which is not an image format', ['generate', 'x', '-o', 'x.txt'], None),
    ('has no extension', ['generate', 'x', '-o', 'noext'], None),
    ('is not a regular file', ['generate', 'x', '-o', '/dev/full'], None),
    ('is a directory', ['generate', 'x', '-o', '{dir}'], None),
    ("dtype must be 'auto'", ['generate', 'x', '--dtype', 'fp8'], None),
    ('expected a number or START END', ['generate', 'x', '--cfg', '3', '1', '2'], None),
    ("renoise must be one of random, confidence, halton, critic, got 'best'", ['generate', 'x', '--renoise', 'best'], None),
    ("renoise must be one of random, confidence, halton, critic, got 'Halton'",
     ['inpaint', '{apple}', '{apple}', 'x', '--renoise', 'Halton'], None),
    ("renoise_rule must be one of random, confidence, halton, critic, got 'best'",
     None, ('__call__', ('x',), dict(renoise_rule='best'), ValueError)),
    ("renoise_rule must be one of random, confidence, halton, critic, got None",
     None, ('edit', ('{apple}', 'x'), dict(renoise_rule=None), ValueError)),
]
if not torch.cuda.is_available():
    CASES.append(('device cuda: this PyTorch build or machine has no cuda device', ['generate', 'x', '--device', 'cuda'],
                  None))


def fill(values, apple, folder):
    def one(v):
        return v.format(apple=apple, dir=folder, huge=apple.parent / 'huge.png') if isinstance(v, str) else v
    return [one(v) for v in values]


@pytest.mark.parametrize('sentence, argv', [(s, a) for s, a, _ in CASES if a], ids=lambda v: str(v)[:40])
def test_cli_says_one_line_before_loading(sentence, argv, apple, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Pipeline, 'from_pretrained', lambda *a, **k: pytest.fail('a model was loaded'))
    assert main(fill(argv, apple, tmp_path)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ': error: ' in line]
    assert len(errors) == 1 and sentence in errors[0] and 'Traceback' not in err, err


@pytest.mark.parametrize('sentence, call', [(s, c) for s, _, c in CASES if c], ids=lambda v: str(v)[:40])
def test_python_api_raises_the_same_sentence(sentence, call, pipe, apple, tmp_path, monkeypatch):
    monkeypatch.setattr('paella.pipeline.sample', lambda *a, **k: pytest.fail('sampling started'))
    method, args, kwargs, error = call
    with pytest.raises(error, match=re.escape(sentence)):
        getattr(pipe, method)(*fill(args, apple, tmp_path), **kwargs)


@pytest.mark.parametrize('meta, sentence', [
    ('{"settings": {"steps": 12,', 'is not valid JSON'),
    ('{"text_encoder": {"type": "minilm"}}', "must hold a JSON object with 'settings' and 'text_encoder'"),
    ('{"settings": {}, "text_encoder": {"type": "minilm"}, "extra": 1}', "unknown key(s) ['extra']"),
    ('{"settings": {"stepz": 3}, "text_encoder": {"type": "minilm"}}', "unknown setting 'stepz'"),
    ('{"settings": {"steps": 0}, "text_encoder": {"type": "minilm"}}', 'steps must be between 1 and'),
    ('{"settings": {"renoise_rule": "best"}, "text_encoder": {"type": "minilm"}}', 'renoise_rule must be one of'),
    ('{"settings": {}, "text_encoder": "minilm"}', "'text_encoder' must be an object with a 'type'"),
])
def test_a_broken_pipeline_json_is_named(meta, sentence, tmp_path, monkeypatch, capsys):
    (tmp_path / 'pipeline.json').write_text(meta)
    with pytest.raises(CheckpointError, match=re.escape(sentence)) as e:
        Pipeline.from_pretrained(tmp_path)
    assert str(tmp_path / 'pipeline.json') in str(e.value)
    assert main(['generate', 'x', '--model', str(tmp_path), '-o', str(tmp_path / 'a.png')]) == 2
    err = capsys.readouterr().err
    assert sentence in err and 'Traceback' not in err


def test_whole_numbers_are_cleaned_not_refused(pipe):
    """12.0 steps is 12 steps (JSON and numpy give such numbers); the sampler gets ints and tuples."""
    s = pipe.settings_with({'steps': 12.0, 'latent_size': [16.0, 8], 'cfg': [3, 1]})
    assert (s.steps, s.latent_size, s.cfg) == (12, (16, 8), (3.0, 1.0)) and type(s.steps) is int
    assert pipe.options(seed=np.int64(5)).seed == 5
    assert pipe.settings_with({'mode': 'argmax', 'temperature': 0}).temperature == 0   # argmax never reads it


def test_damaged_weights_are_refused_by_their_digest(tmp_path):
    """200 KB of random bytes inside a tensor loaded and drew a pale grid; the digest in config.json says so."""
    from paella import Paella
    folder = tmp_path / 'generator'
    shutil.copytree(default_model_path() / 'generator', folder)
    weights = folder / 'model.safetensors'
    data = bytearray(weights.read_bytes())
    data[len(data) // 2:len(data) // 2 + 200_000] = np.random.default_rng(0).bytes(200_000)
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match='does not match the sha256 in its config.json'):
        Paella.from_pretrained(folder)


def test_a_pickle_is_refused_without_advice_to_unpickle(tmp_path, capsys):
    path = tmp_path / 'model.pt'
    torch.save({'weights': torch.zeros(2), 'loss': io.BytesIO}, path)      # a class: needs a real unpickler
    assert main(['info', str(path)]) == 2
    err = capsys.readouterr().err
    assert 'is a pickle' in err and 'weights_only' not in err and 'Traceback' not in err, err


def test_inpaint_gives_back_the_input_size(pipe, recwarn):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 200, 3), dtype=np.uint8))
    mask = np.zeros((100, 200), dtype=bool)
    mask[20:60, 50:120] = True
    out = pipe.inpaint(image, mask, 'red apple', seed=0, steps=2)[0]
    assert out.size == (200, 100)
    assert np.array_equal(np.asarray(out)[~mask], np.asarray(image)[~mask])     # kept pixels are the input's
    assert any('inpainted on the model' in str(w.message) for w in recwarn)


def test_progress_bar_on_a_terminal(monkeypatch):
    from paella.cli.common import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    terminal = Terminal()
    monkeypatch.setattr('sys.stderr', terminal)
    step = progress(12, 'generate')
    for i in range(12):
        step(i, None)
    assert '12/12' in terminal.getvalue()
    monkeypatch.setattr('sys.stderr', io.StringIO())                            # not a terminal: silent
    progress(12, 'generate')(0, None)
    assert terminal.getvalue().count('generate') >= 1


def test_serve_and_library_share_the_sentences():
    """The server's Fields and the library's checks are one implementation: the same sentence for a seed."""
    from paella import checks
    from paella.serve.limits import BadRequest, Fields, Limits
    with pytest.raises(BadRequest) as served:
        Fields(Limits()).sampling({'seed': 1.5})
    with pytest.raises(ValueError) as library:
        checks.seed(1.5)
    assert str(served.value) == str(library.value) == 'seed must be a whole number, got 1.5'


def test_json_roundtrip_of_a_saved_pipeline_still_loads(pipe, tmp_path):
    """The checks of pipeline.json accept what save_pretrained writes; a pipeline built by hand without the
    text encoder's spec is refused at save time (its folder could not be loaded)."""
    pipe.save_pretrained(tmp_path)
    json.loads((tmp_path / 'pipeline.json').read_text())
    assert Pipeline.from_pretrained(tmp_path).settings == pipe.settings
    by_hand = Pipeline(pipe.generator, pipe.vqgan, pipe.text_encoder, settings=pipe.settings)
    with pytest.raises(ValueError, match='does not say how to load its text encoder'):
        by_hand.save_pretrained(tmp_path / 'by-hand')
    assert not (tmp_path / 'by-hand').exists()
