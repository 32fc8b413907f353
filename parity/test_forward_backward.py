"""Parity of the forward and backward passes: logits, loss and every gradient by name, on random
small configurations (hypothesis) in float64 and float32, and the book's 124M model once."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npgpt

from .helpers import assert_close, build_pair, perturb, random_batch

FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None)


@st.composite
def small_configs(draw):
    n_heads = draw(st.integers(1, 4))
    head_dim = draw(st.integers(-(-8 // n_heads), 32 // n_heads))      # emb_dim in [8, 32]
    return npgpt.GPTConfig(vocab_size=draw(st.integers(50, 100)), context_length=16,
                           emb_dim=n_heads * head_dim, n_heads=n_heads, n_layers=draw(st.integers(1, 2)),
                           drop_rate=draw(st.sampled_from([0.0, 0.1, 0.5])),   # eval(): must be off
                           qkv_bias=draw(st.booleans()), tie_weights=draw(st.booleans()))


cases = st.tuples(small_configs(), st.integers(1, 3), st.integers(1, 16), st.integers(0, 2**16))


def eval_pair(cfg, dtype, seed):
    params = perturb(npgpt.init_params(cfg, seed, dtype), seed)
    np_model, torch_model = build_pair(cfg, dtype, seed, params)
    return np_model.eval(), torch_model.eval()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@FAST
@given(case=cases)
def test_logits_and_loss(dtype, case):
    cfg, B, T, seed = case
    np_model, torch_model = eval_pair(cfg, dtype, seed)
    inputs, targets = random_batch(cfg, B, T, seed)
    logits_atol = 1e-10 if dtype == "float64" else 1e-4
    assert_close("logits", np_model.logits(inputs), torch_model.logits(inputs), atol=logits_atol)
    loss_tol = {"atol": 1e-10} if dtype == "float64" else {"rtol": 1e-5}
    assert_close("loss", np_model.loss(inputs, targets), torch_model.loss(inputs, targets), **loss_tol)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@FAST
@given(case=cases)
def test_every_gradient(dtype, case):
    cfg, B, T, seed = case
    np_model, torch_model = eval_pair(cfg, dtype, seed)
    inputs, targets = random_batch(cfg, B, T, seed)
    np_loss, np_grads = np_model.loss_and_grads(inputs, targets)
    torch_loss, torch_grads = torch_model.loss_and_grads(inputs, targets)
    assert list(np_grads) == list(torch_grads) == list(np_model.shapes)
    assert_close("loss", np_loss, torch_loss, **({"atol": 1e-10} if dtype == "float64" else {"rtol": 1e-5}))
    for name, ref in torch_grads.items():
        assert np_grads[name].dtype == ref.dtype == np.dtype(dtype)
        if dtype == "float64":
            assert_close(name, np_grads[name], ref, atol=1e-12, rtol=1e-8)
        else:
            # float32 sums of B*T terms lose ~1e-7 relative to the largest term, so entries near
            # zero are judged against the gradient's own scale: atol = 1e-5 * max|g|
            assert_close(name, np_grads[name], ref, atol=1e-5 * np.abs(ref).max(), rtol=1e-3)


def test_book_124m_float32():
    cfg = npgpt.GPTConfig.preset("book-124m")
    np_model, torch_model = build_pair(cfg, "float32", seed=123)
    np_model.eval(), torch_model.eval()
    inputs, targets = random_batch(cfg, 1, 256, seed=7)
    assert_close("logits", np_model.logits(inputs), torch_model.logits(inputs), atol=1e-4)
    assert_close("loss", np_model.loss(inputs, targets), torch_model.loss(inputs, targets), rtol=1e-5)


def test_params_round_trip_and_strict_loading():
    cfg = npgpt.GPTConfig.preset("tiny", vocab_size=60, context_length=16)
    params = perturb(npgpt.init_params(cfg, 1, "float64"), 1)
    np_model, torch_model = build_pair(cfg, "float64", params=params)
    for model in (np_model, torch_model):
        out = model.params()
        assert list(out) == list(params)
        for name in params:
            np.testing.assert_array_equal(out[name], params[name], err_msg=name)
        out["wte"] += 1.0                      # a copy, not a view of the model's weights
        np.testing.assert_array_equal(model.params()["wte"], params["wte"])
    bad = dict(params, **{"h.0.attn.c_attn.weight": params["h.0.attn.c_attn.weight"].T})
    missing = {n: p for n, p in params.items() if n != "ln_f.bias"}
    for broken in (bad, missing):
        errors = []
        for model in (np_model, torch_model):
            with pytest.raises(ValueError) as e:
                model.load_params(broken)
            errors.append(str(e.value))
        assert errors[0] == errors[1]
