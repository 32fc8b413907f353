"""Decoding parity: next-token probabilities (temperature, top-k, top-p) on random logits and edge
cases, each backend's sampler against the exact distribution and against each other (chi-square),
greedy generation with and without the KV cache, and cached logits against full recomputation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import npgpt
from npgpt import sampling as np_sampling
from npgpt.torch_backend import sampling as torch_sampling

from .helpers import assert_close, build_pair, perturb, random_batch

INF = np.inf


def both_probs(logits, **kwargs):
    np_probs = np_sampling.next_token_probs(logits, **kwargs)
    torch_probs = torch_sampling.next_token_probs(torch.from_numpy(np.asarray(logits, np.float64)), **kwargs)
    assert torch_probs.dtype == torch.float64
    return np_probs, torch_probs.numpy()


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("top_k", [None, 1, 5, 40])
@pytest.mark.parametrize("top_p", [None, 0.3, 0.9, 1.0])
def test_probs_on_random_logits(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(0.0, 3.0, (2, 3, 40))       # (..., V)
    np_probs, torch_probs = both_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert_close("probs", torch_probs, np_probs, atol=1e-12)
    assert_close("row sums", np_probs.sum(-1), 1.0, atol=1e-12)


EDGE_LOGITS = np.array([3.0, 1.0, 2.0, 2.0, 0.0, -INF, 2.0, -1.0])     # ties at 2.0, one -inf


@pytest.mark.parametrize("kwargs, support", [
    ({"temperature": 0.0}, [0]),
    ({"temperature": 0.0, "top_k": 3}, [0]),
    ({"temperature": 1.0, "top_k": 2}, [0, 2, 3, 6]),       # ties with the k-th value are kept
    ({"temperature": 1.0, "top_k": 4}, [0, 2, 3, 6]),
    ({"temperature": 1.0, "top_k": 5}, [0, 1, 2, 3, 6]),
    ({"temperature": 1.0, "top_k": 1}, [0]),
    ({"temperature": 1.0, "top_k": 8}, [0, 1, 2, 3, 4, 6, 7]),  # k = V: only the -inf is out
    ({"temperature": 1e-3}, [0]),                             # all but the argmax underflow
    ({"temperature": 100.0}, [0, 1, 2, 3, 4, 6, 7]),
    ({"temperature": 1.0, "top_p": 1e-9}, [0]),
    ({"temperature": 1.0, "top_p": 1.0}, [0, 1, 2, 3, 4, 6, 7]),
    ({"temperature": 1.0, "top_p": 0.55}, [0, 2]),             # ties broken by lower token id
    ({"temperature": 0.5, "top_k": 4, "top_p": 0.95}, [0, 2, 3, 6]),
])
def test_probs_edge_cases(kwargs, support):
    np_probs, torch_probs = both_probs(EDGE_LOGITS, **kwargs)
    assert_close("probs", torch_probs, np_probs, atol=1e-12)
    assert np.flatnonzero(np_probs).tolist() == support
    assert np.flatnonzero(torch_probs).tolist() == support


def test_probs_top_p_exact_boundary():
    """Four equal logits give probabilities of exactly 0.25: with top_p = 0.5 the third token has
    exactly 0.5 of more likely mass before it, and is out (the rule is 'before < top_p')."""
    np_probs, torch_probs = both_probs(np.zeros((2, 4)), temperature=1.0, top_p=0.5)
    np.testing.assert_array_equal(np_probs, [[0.5, 0.5, 0.0, 0.0]] * 2)
    np.testing.assert_array_equal(torch_probs, np_probs)


def test_probs_greedy_ties_and_rows():
    logits = np.array([[1.0, 5.0, 5.0, -INF], [-INF, -INF, 0.0, -INF]])
    np_probs, torch_probs = both_probs(logits, temperature=0.0)
    np.testing.assert_array_equal(np_probs, [[0, 1, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(torch_probs, np_probs)


def pooled(counts_or_expected, expected, min_expected=5.0):
    """Merge bins whose expected count is below min_expected into one (chi-square's rule)."""
    small = expected < min_expected
    out = counts_or_expected[~small]
    return np.append(out, counts_or_expected[small].sum()) if small.any() else out


def test_samplers_match_the_distribution_and_each_other():
    n = 20_000
    logits = np.random.default_rng(3).normal(0.0, 1.5, 30)
    probs = np_sampling.next_token_probs(logits, temperature=0.8, top_k=20)          # (V,), 10 zeros
    np_draws = np_sampling.sample(np.tile(probs, (n, 1)), np.random.default_rng(42))
    torch_draws = torch_sampling.sample(torch.from_numpy(probs).expand(n, -1),
                                        torch.Generator().manual_seed(42)).numpy()
    support = probs > 0
    expected = n * probs[support]
    counts = {}
    for name, draws in (("numpy", np_draws), ("torch", torch_draws)):
        c = np.bincount(draws, minlength=probs.size)
        assert c[~support].sum() == 0, f"{name} drew a token of probability zero"
        counts[name] = c[support]
        chi2, p = stats.chisquare(pooled(counts[name], expected), pooled(expected, expected))
        assert p > 1e-3, f"{name} sampler vs exact probabilities: chi2 = {chi2:.1f}, p = {p:.2e}"
    table = np.stack([pooled(counts["numpy"], expected), pooled(counts["torch"], expected)])
    chi2, p, _, _ = stats.chi2_contingency(table)
    assert p > 1e-3, f"numpy vs torch samples: chi2 = {chi2:.1f}, p = {p:.2e}"


def test_chi_square_detects_a_wrong_distribution():
    """The goodness-of-fit test above has power: a sampler of slightly different probabilities fails it."""
    n = 20_000
    probs = np_sampling.next_token_probs(np.random.default_rng(3).normal(0.0, 1.5, 30), temperature=0.8)
    wrong = np_sampling.next_token_probs(np.random.default_rng(3).normal(0.0, 1.5, 30), temperature=0.9)
    counts = np.bincount(np_sampling.sample(np.tile(wrong, (n, 1)), np.random.default_rng(42)), minlength=30)
    expected = n * probs
    assert stats.chisquare(pooled(counts, expected), pooled(expected, expected)).pvalue < 1e-3


GEN_CASES = {
    "fits": npgpt.GPTConfig(vocab_size=90, context_length=64, emb_dim=32, n_heads=4, n_layers=2,
                            drop_rate=0.5, qkv_bias=True),
    "slides": npgpt.GPTConfig(vocab_size=90, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                              drop_rate=0.5, tie_weights=True),
}


@pytest.mark.parametrize("case", list(GEN_CASES))
def test_greedy_generation(case):
    cfg = GEN_CASES[case]
    params = perturb(npgpt.init_params(cfg, 8, "float64"), 8, scale=0.3)
    models = build_pair(cfg, "float64", params=params)     # left in training mode: generate turns dropout off
    prompt = random_batch(cfg, 2, 5, seed=2)[0]
    outs = {(m.backend, cache): npgpt.generate(m, prompt, max_new_tokens=50, temperature=0.0, use_cache=cache)
            for m in models for cache in (True, False)}
    reference = outs["numpy", False]
    assert reference.shape == (2, 55) and reference.dtype == np.int64
    np.testing.assert_array_equal(reference[:, :5], prompt)
    assert len(np.unique(reference[:, 5:])) > 3, "a degenerate continuation would prove little"
    for key, out in outs.items():
        np.testing.assert_array_equal(out, reference, err_msg=str(key))
    for m in models:
        assert m.training, f"{m.backend}: generate must restore the training flag"
    # eos: row 0 stops at the first eos and is padded; both backends alike
    eos = int(reference[0, 12])
    with_eos = [npgpt.generate(m, prompt, max_new_tokens=50, temperature=0.0, eos_id=eos) for m in models]
    np.testing.assert_array_equal(with_eos[1], with_eos[0])
    first = 5 + int(np.argmax(with_eos[0][0, 5:] == eos))
    assert np.all(with_eos[0][0, first:] == eos)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_kv_cache_equals_recomputation(dtype, atol):
    """Cached logits at every position, fed one token at a time and in chunks (float32 goes
    through scaled_dot_product_attention, with an explicit mask for chunks after the first)."""
    cfg = GEN_CASES["fits"]
    _, model = build_pair(cfg, "float64" if dtype == torch.float64 else "float32",
                          params=perturb(npgpt.init_params(cfg, 8, "float64"), 8, scale=0.3))
    module = model.eval().module
    ids = torch.from_numpy(random_batch(cfg, 2, cfg.context_length, seed=4)[0])
    with torch.no_grad():
        full = module(ids)                                                    # (B, T, V)
        cache = model.new_kv_cache(2, cfg.context_length)
        t = 0
        for chunk in [3, 1, 1, 4, 1, 7] + [1] * 47:
            last = module(ids[:, t:t + chunk], cache=cache)[:, -1]            # (B, V)
            t += chunk
            assert_close(f"logits at position {t - 1}", last.numpy(), full[:, t - 1].numpy(), atol=atol)
        assert t == cache.length == cfg.context_length


def test_torch_sampling_generation():
    cfg = GEN_CASES["slides"]
    _, model = build_pair(cfg, "float64", params=perturb(npgpt.init_params(cfg, 8, "float64"), 8, scale=0.3))
    prompt = random_batch(cfg, 3, 4, seed=2)[0]
    run = lambda **kw: npgpt.generate(model, prompt, max_new_tokens=30, **kw)
    a, b, c = run(temperature=1.0, seed=7), run(temperature=1.0, seed=7), run(temperature=1.0, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(run(temperature=1.0, top_k=1, seed=3), run(temperature=0.0))
    np.testing.assert_array_equal(run(temperature=1.5, top_p=1e-9, seed=3, use_cache=False), run(temperature=0.0))
