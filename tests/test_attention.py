"""Attention reweighting of conditioning keys, as the published v3 demo's CustomMultiheadAttention does it."""
import pytest
import torch
import torch.nn.functional as F

from paella.blocks import Attention


def published_attention(attn, q_in, kv_in, attn_weights):
    """The published demo's math: explicit softmax, probabilities of the last keys multiplied after it."""
    w, b = attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3)
    heads = lambda t: t.view(t.size(0), t.size(1), attn.num_heads, -1).permute(0, 2, 1, 3)
    q, k, v = heads(F.linear(q_in, w[0], b[0])), heads(F.linear(kv_in, w[1], b[1])), heads(F.linear(kv_in, w[2], b[2]))
    p = ((q @ k.transpose(-2, -1)) / q.size(-1) ** 0.5).softmax(dim=-1)
    if attn_weights is not None:
        weights = torch.ones(p.shape[2], p.shape[3])
        weights[:, -attn_weights.shape[0]:] = attn_weights
        p = p * weights
    x = (p @ v).permute(0, 2, 1, 3).reshape(q_in.size(0), q_in.size(1), -1)
    return attn.out_proj(x)


@pytest.fixture
def attn():
    torch.manual_seed(0)
    return Attention(32, 4).eval()


def test_matches_multihead_attention_without_weights(attn):
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    mha.load_state_dict(attn.state_dict())
    x, kv = torch.randn(2, 9, 32), torch.randn(2, 13, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, kv), mha(x, kv, kv, need_weights=False)[0], atol=1e-5, rtol=0)


def test_reweighting_matches_the_published_math(attn):
    x, kv = torch.randn(2, 9, 32), torch.randn(2, 13, 32)
    w = torch.tensor([1.2] * 6 + [0.4] * 4)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, kv, w), published_attention(attn, x, kv, w), atol=1e-5, rtol=0)
        assert (attn(x, kv, w) - attn(x, kv)).abs().max() > 1e-3


def test_weights_of_one_give_identical_logits(tiny_paella, paella_fixture):
    _, inp, _, _ = paella_fixture
    args = (inp['x'], inp['r'], inp['byt5'], inp['clip'], inp['clip_image'])
    with torch.no_grad():
        plain = tiny_paella(*args)
        assert torch.equal(tiny_paella(*args, attn_weights=torch.ones(7)), plain)
        assert (tiny_paella(*args, attn_weights=torch.full((7,), 0.5)) - plain).abs().max() > 1e-3
