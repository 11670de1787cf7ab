"""The retrieval prior (paella/captions.py): an unseen prompt is drawn as the training caption nearest to it,
a known caption is kept as typed (same image as without the prior), the draw is seeded and leaves the
sampler's generator alone, and the folder round-trips and refuses damage."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from paella.captions import Captions, folder_pairs
from paella.checkpoint import CheckpointError
from paella.cli import main
from paella.pipeline import Pipeline, default_model_path

PAIRS = [('red apple', 'red apple'), ('green apple', 'green apple'), ('cat face', 'cat face'),
         ('kitty', 'cat face'), ('cat', 'cat'), ('fire engine', 'fire engine'), ('banana', 'banana'),
         ('dog face', 'dog face'), ('puppy', 'dog face')]


@pytest.fixture(scope='module')
def captions(minilm):
    return Captions.build(minilm, PAIRS)


@pytest.fixture(scope='module')
def pipe(hf_offline):
    return Pipeline.from_pretrained()


def test_unseen_prompts_are_drawn_as_their_nearest_caption(captions, minilm):
    prompts = ['a shiny red apple', 'a fire truck', 'bananna', 'a cute little doggy', 'red apple', 'Kitty', '']
    assert captions.choose(minilm, prompts, 0) == ['red apple', 'fire engine', 'banana', 'dog face', 'red apple',
                                                   'Kitty', '']          # known captions and '' as typed
    assert captions.targets == ['red apple', 'green apple', 'cat face', 'cat', 'fire engine', 'banana', 'dog face']
    assert captions.respelled('a piece of bananna', {}) == 'a piece of banana'


def test_the_draw_is_seeded_spread_for_generic_prompts_and_leaves_the_generator_alone(captions, minilm):
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    cats = captions.choose(minilm, ['a cat'] * 32, 0.05, g)
    assert torch.equal(g.get_state(), state)                      # the sampler draws what it drew before
    assert cats == captions.choose(minilm, ['a cat'] * 32, 0.05, torch.Generator().manual_seed(0))
    assert set(cats) == {'cat', 'cat face'}                      # a generic prompt: its near ties, both
    apples = captions.choose(minilm, ['a shiny red apple'] * 32, 0.03, torch.Generator().manual_seed(1))
    assert set(apples) == {'red apple'}                         # a specific one: its own


def test_known_captions_keep_their_image_and_unseen_ones_get_their_captions(pipe):
    assert pipe.captions is not None and pipe.settings.caption_temperature is not None
    off = {'caption_temperature': None}
    known = pipe.tokens(['red apple', 'fire engine'], seed=3)
    assert torch.equal(known, pipe.tokens(['red apple', 'fire engine'], seed=3, **off))
    drawn = pipe.drawn_as(['a shiny red apple', 'a tall yellow sunflower'], generator=torch.Generator().manual_seed(3))
    assert drawn == ['red apple', 'sunflower']
    assert torch.equal(pipe.tokens(['a shiny red apple', 'a tall yellow sunflower'], seed=3),
                       pipe.tokens(drawn, seed=3, **off))
    assert pipe.drawn_as(['a shiny red apple'], pipe.settings_with(off), seed=3) == ['a shiny red apple']
    assert not torch.equal(pipe.tokens(['a shiny red apple'], seed=3, **off), pipe.tokens(['red apple'], seed=3, **off))
    with pytest.raises(ValueError, match='caption_temperature'):
        pipe.tokens(['a cat'], seed=0, caption_temperature=-1)


def test_caption_temperature_none_on_the_command_line_draws_as_typed(pipe, tmp_path):
    import numpy as np
    from PIL import Image
    out = tmp_path / 'typed.png'
    assert main(['generate', 'a shiny red apple', '--seed', '3', '--caption-temperature', 'none', '-o', str(out)]) == 0
    typed = pipe(['a shiny red apple'], seed=3, caption_temperature=None)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(typed))
    assert main(['generate', 'a cat', '--caption-temperature', 'warm']) == 2


def test_saved_pipelines_keep_the_prior_and_fused_ones_drop_it(tmp_path, hf_offline):
    pipe = Pipeline.from_pretrained()
    pipe.save_pretrained(tmp_path / 'p')
    again = Pipeline.from_pretrained(tmp_path / 'p')
    prompts = ['a cat'] * 4 + ['a shiny red apple']
    assert again.drawn_as(prompts, seed=5) == pipe.drawn_as(prompts, seed=5)
    assert again.settings.caption_temperature == pipe.settings.caption_temperature
    pipe.load_lora(Path(__file__).resolve().parents[1] / 'docs' / 'lora_kiwi_adapter')
    pipe.fuse_lora()
    pipe.save_pretrained(tmp_path / 'p')                       # over the folder that has a prior
    fused = Pipeline.from_pretrained(tmp_path / 'p')
    assert fused.captions is None and fused.settings.caption_temperature is None
    assert not (tmp_path / 'p' / 'captions').exists()
    assert fused.drawn_as(['kiwi bird icon'], seed=0) == ['kiwi bird icon']


def test_folder_round_trip_and_refusals(captions, minilm, tmp_path):
    captions.save_pretrained(tmp_path)
    again = Captions.from_pretrained(tmp_path)
    prompts = ['a cat'] * 8 + ['a fire truck']
    assert again.choose(minilm, prompts, 0.05, torch.Generator().manual_seed(2)) == \
        captions.choose(minilm, prompts, 0.05, torch.Generator().manual_seed(2))
    again.encoder_id = 'byt5:google/byt5-small'
    with pytest.raises(ValueError, match='build them again'):
        again.choose(minilm, ['a cat'], 0)
    (tmp_path / 'captions' / 'captions.safetensors').write_bytes(b'not a safetensors file')
    with pytest.raises(CheckpointError, match='captions folder'):
        Captions.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match='keys need'):
        Captions(['a', 'b'], ['a'], torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), 'x')


def test_captions_command_writes_the_prior_into_a_pipeline_folder(tmp_path, hf_offline, capsys):
    data = tmp_path / 'data'
    data.mkdir()
    rows = [{'file_name': 'a.png', 'text': 'red apple'}, {'file_name': 'a.png', 'text': 'apple', 'alias': True},
            {'file_name': 'b.png', 'text': 'fire engine'}]
    (data / 'metadata.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    assert folder_pairs(data) == [('red apple', 'red apple'), ('apple', 'red apple'), ('fire engine', 'fire engine')]
    model = tmp_path / 'model'
    model.mkdir()
    shutil.copy(default_model_path() / 'pipeline.json', model)
    assert main(['captions', str(model), '--data', str(data), '--temperature', '0.05']) == 0
    assert 'wrote 3 captions pointing to 2 targets' in capsys.readouterr().out
    assert json.loads((model / 'pipeline.json').read_text())['settings']['caption_temperature'] == 0.05
    assert Captions.from_pretrained(model).targets == ['red apple', 'fire engine']
    assert main(['captions', str(model), '--data', str(data), '--temperature', '-1']) == 2


def test_adapters_turn_the_prior_off(pipe):
    def g():
        return torch.Generator().manual_seed(0)
    assert pipe.drawn_as(['kiwi bird icon'], generator=g()) != ['kiwi bird icon']       # not a caption it knows
    pipe.load_lora(Path(__file__).resolve().parents[1] / 'docs' / 'lora_kiwi_adapter')
    try:
        assert pipe.drawn_as(['kiwi bird icon'], generator=g()) == ['kiwi bird icon']   # the adapter's caption
    finally:
        pipe.unload_lora()
    assert pipe.drawn_as(['kiwi bird icon'], generator=g()) != ['kiwi bird icon']
