"""Behaviour is unchanged, bit for bit: the default model's tokens in every mode and a tiny training run of
each recipe, against the golden file recorded before the redesign (`tests/golden.py` says how)."""
from safetensors.torch import load_file

import golden


def differences(expected, got):
    """Entries that are missing, extra, or not exactly equal (with how many values differ)."""
    out = [f"{k}: missing" for k in expected.keys() - got.keys()] + [f"{k}: new" for k in got.keys() - expected.keys()]
    for k in sorted(expected.keys() & got.keys()):
        a, b = expected[k], got[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            out.append(f"{k}: {tuple(a.shape)} {a.dtype} -> {tuple(b.shape)} {b.dtype}")
        elif not a.equal(b):
            out.append(f"{k}: {int((a != b).sum())} of {a.numel()} values differ")
    return out


def test_default_model_tokens_are_the_golden_ones():
    expected = load_file(str(golden.GOLDEN / 'default_model_tokens.safetensors'))
    assert differences(expected, golden.model_outputs()) == []


def test_tiny_training_runs_end_at_the_golden_weights():
    expected = load_file(str(golden.GOLDEN / 'training_weights.safetensors'))
    assert {k.split('.')[0] for k in expected} == {'generator', 'vqgan', 'prior'}
    assert differences(expected, golden.training_outputs()) == []
