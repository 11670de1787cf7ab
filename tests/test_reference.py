"""Equivalence with the published Paella v3 code, through the test vectors in tests/fixtures (produced by the published code; see its README)."""
import json

import torch

from paella import Paella, VQModel, sample
from conftest import fixtures_dir

ATOL = 1e-5


def test_paella_logits_match_published(tiny_paella, paella_fixture):
    _, inp, exp, _ = paella_fixture
    with torch.no_grad():
        full = tiny_paella(inp['x'], inp['r'], inp['byt5'], inp['clip'], inp['clip_image'])
        text_only = tiny_paella(inp['x'], inp['r'], inp['byt5'])
    assert full.shape == (2, 64, 16, 16)
    torch.testing.assert_close(full, exp['logits_full'], atol=ATOL, rtol=0)
    torch.testing.assert_close(text_only, exp['logits_text_only'], atol=ATOL, rtol=0)
    # The two differ, so the CLIP inputs really reach the network.
    assert (full - text_only).abs().max() > 1e-2


def test_embeddings_noise_and_loss_weight_match_published(tiny_paella, paella_fixture):
    _, inp, exp, _ = paella_fixture
    with torch.no_grad():
        torch.testing.assert_close(tiny_paella.gen_r_embedding(inp['r']), exp['r_embed'], atol=ATOL, rtol=0)
        c = tiny_paella.gen_c_embeddings(inp['byt5'], inp['clip'], inp['clip_image'])
    assert c.shape == (2, 7 + 4 + 4, 32)
    torch.testing.assert_close(c, exp['c_embed'], atol=ATOL, rtol=0)
    noised, mask = tiny_paella.add_noise(inp['x'], torch.zeros(2), mask=inp['noise_mask'],
                                         random_x=inp['noise_random_x'])
    assert torch.equal(noised, exp['noised_x']) and torch.equal(mask, inp['noise_mask'])
    w = tiny_paella.get_loss_weight(inp['loss_weight_t'], inp['noise_mask'])
    torch.testing.assert_close(w, exp['loss_weight'], atol=ATOL, rtol=0)


def test_sampler_reproduces_published_tokens(tiny_paella, paella_fixture, conds):
    _, _, exp, _ = paella_fixture
    cond, uncond = conds
    torch.manual_seed(42)
    tokens = sample(tiny_paella, cond, (2, 16, 16), unconditional_inputs=uncond, steps=6, renoise_steps=5,
                    temperature=(1.0, 0.2), cfg=4.0, mode='multinomial')
    assert torch.equal(tokens, exp['sampled_seed42'])


def test_vqgan_matches_published(tiny_vq, vq_fixture):
    _, inp, exp, _ = vq_fixture
    with torch.no_grad():
        quantized, latent, indices, _ = tiny_vq.encode(inp['image'])
        assert torch.equal(indices, exp['indices'])
        assert torch.equal(tiny_vq.encode_indices(inp['image']), exp['indices'])
        torch.testing.assert_close(latent, exp['latent'], atol=ATOL, rtol=0)
        torch.testing.assert_close(quantized, exp['quantized_latent'], atol=ATOL, rtol=0)
        torch.testing.assert_close(tiny_vq.decode_indices(exp['indices']), exp['decoded_from_indices'],
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(tiny_vq.decode(exp['quantized_latent']), exp['decoded_from_latent'],
                                   atol=ATOL, rtol=0)


def test_quantizer_is_straight_through_and_exact(tiny_vq, vq_fixture):
    # With gradients on, the quantized latent must still be exactly the codebook rows (not x + (q - x)).
    _, inp, exp, _ = vq_fixture
    image = inp['image'].clone().requires_grad_(True)
    quantized, _, _, loss = tiny_vq.encode(image)
    assert torch.equal(quantized.detach(), exp['quantized_latent'])
    (quantized.sum() + loss).backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def _shapes(path):
    return json.loads((fixtures_dir() / path).read_text())


def test_full_size_v3_has_published_keys_and_shapes():
    ref = _shapes('paella_v3_state_dict_shapes.json')
    with torch.device('meta'):
        model = Paella(Paella.make_config('v3'))
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(ref['state_dict_shapes'])
    assert got == ref['state_dict_shapes']
    assert model.num_parameters() == ref['num_parameters'] == 1_008_350_592


def test_default_vqgan_has_published_keys_and_shapes():
    ref = _shapes('vqgan_f4_state_dict_shapes.json')
    with torch.device('meta'):
        model = VQModel()
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == ref['state_dict_shapes']
    assert model.num_parameters() == ref['num_parameters'] == 18_406_894
