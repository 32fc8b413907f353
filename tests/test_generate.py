"""Decoding in the NumPy backend: the KV cache against full recomputation, greedy decoding
against the book's generate_text_simple, and the temperature / top-k / top-p rules."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import npgpt
from npgpt.numpy_backend.generate import forward_cached

CFG = npgpt.GPTConfig(vocab_size=97, context_length=24, emb_dim=16, n_heads=4, n_layers=2, qkv_bias=True)


def book_generate_text_simple(model, idx, max_new_tokens, context_size):
    """The book's loop: full forward on the cropped context, argmax of the last position."""
    for _ in range(max_new_tokens):
        logits = model.logits(idx[:, -context_size:])[:, -1]
        idx = np.concatenate([idx, logits.argmax(-1)[:, None]], axis=1)
    return idx


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_kv_cache_logits_equal_full_recomputation(dtype, tol):
    model = npgpt.build_model(CFG, dtype=dtype, seed=5).eval()
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 20))
    cache = model.new_kv_cache(2, CFG.context_length)
    got = [forward_cached(model, ids[:, :6], cache)]              # prefill 6 tokens, then one at a time
    got += [forward_cached(model, ids[:, t:t + 1], cache) for t in range(6, 20)]
    full = model.logits(ids)                                      # (B, T, V)
    for i, t in enumerate(range(5, 20)):
        np.testing.assert_allclose(got[i], full[:, t], atol=tol, rtol=0, err_msg=f"position {t}")


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_equals_the_books_loop_past_the_context(use_cache):
    """40 new tokens from a 10-token prompt: the window slides past context_length=24."""
    model = npgpt.build_model(CFG, dtype="float64", seed=7).eval()
    ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 10))
    out = npgpt.generate(model, ids, max_new_tokens=40, temperature=0.0, use_cache=use_cache)
    np.testing.assert_array_equal(out, book_generate_text_simple(model, ids, 40, CFG.context_length))


def test_context_size_crops_the_prompt():
    model = npgpt.build_model(CFG, dtype="float64", seed=7).eval()
    ids = np.random.default_rng(2).integers(0, CFG.vocab_size, (1, 12))
    out = npgpt.generate(model, ids, max_new_tokens=5, context_size=4, temperature=0.0)
    np.testing.assert_array_equal(out, book_generate_text_simple(model, ids, 5, 4))


def test_eos_stops_and_pads():
    model = npgpt.build_model(CFG, dtype="float64", seed=7).eval()
    ids = np.random.default_rng(3).integers(0, CFG.vocab_size, (1, 5))
    free = npgpt.generate(model, ids, max_new_tokens=10, temperature=0.0)
    eos = int(free[0, 7])                                         # the third generated token
    out = npgpt.generate(model, ids, max_new_tokens=10, temperature=0.0, eos_id=eos)
    first = 5 + list(free[0, 5:]).index(eos)
    np.testing.assert_array_equal(out, free[:, :first + 1])


def test_sampling_is_seeded_and_generation_restores_training_mode():
    model = npgpt.build_model(CFG, seed=7)
    ids = np.array([[1, 2, 3]])
    a = npgpt.generate(model, ids, max_new_tokens=15, temperature=1.5, top_k=20, seed=42)
    b = npgpt.generate(model, ids, max_new_tokens=15, temperature=1.5, top_k=20, seed=42)
    c = npgpt.generate(model, ids, max_new_tokens=15, temperature=1.5, top_k=20, seed=43)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert model.training


def reference_probs(logits, temperature, top_k, top_p):
    """A plain, loop-based reading of the rules, for one row."""
    logits = np.array(logits, dtype=np.float64)
    if temperature == 0:
        p = np.zeros_like(logits)
        p[int(np.argmax(logits))] = 1.0
        return p
    if top_k is not None:
        kth = sorted(logits, reverse=True)[top_k - 1]
        logits = np.array([x if x >= kth else -np.inf for x in logits])
    e = np.exp(logits / temperature - np.max(logits / temperature))
    p = e / e.sum()
    if top_p is not None:
        order = sorted(range(len(p)), key=lambda i: (-p[i], i))
        keep, mass = set(), 0.0
        for i in order:
            if mass >= top_p:
                break
            keep.add(i)
            mass += p[i]
        p = np.array([p[i] if i in keep else 0.0 for i in range(len(p))])
        p /= p.sum()
    return p


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.0, 1e-3, 0.5, 1.0, 100.0]),
       st.one_of(st.none(), st.integers(1, 12)), st.one_of(st.none(), st.floats(1e-3, 1.0)))
def test_next_token_probs_rules(seed, temperature, top_k, top_p):
    rng = np.random.default_rng(seed)
    logits = np.round(rng.standard_normal(12) * 3, 1)             # rounding makes ties common
    got = npgpt.next_token_probs(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(got, reference_probs(logits, temperature, top_k, top_p), atol=1e-12)


def test_top_k_keeps_ties_and_minus_inf_gets_zero():
    logits = np.array([2.0, 1.0, 1.0, -np.inf, 0.5])
    p = npgpt.next_token_probs(logits, 1.0, top_k=2)
    assert p[3] == 0 and p[4] == 0 and p[1] == p[2] > 0          # both values tied at the 2nd place stay
    assert p.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": 0}, "top_k"), ({"top_k": 98}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"eos_id": 97}, "eos_id"), ({"max_new_tokens": -1}, "max_new_tokens")])
def test_bad_generation_arguments(kwargs, match):
    model = npgpt.build_model(CFG)
    with pytest.raises(ValueError, match=match):
        npgpt.generate(model, np.array([[1, 2]]), **{"max_new_tokens": 3, **kwargs})


@pytest.mark.parametrize("ids, error", [([[1, 97]], ValueError), ([[-1, 2]], ValueError),
                                        ([[1.5, 2.0]], TypeError), (np.zeros((1, 0), np.int64), ValueError)])
def test_bad_prompt_ids(ids, error):
    with pytest.raises(error):
        npgpt.generate(npgpt.build_model(CFG), ids, max_new_tokens=3)
