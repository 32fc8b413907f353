"""Every hand-written backward of the NumPy backend against central finite differences in float64.

Each layer is checked on f = sum(out * R) for a random R, the whole model on its mean
cross-entropy, with a fourth-order central difference. Entries are sampled from every tensor
(random ones plus the largest); each must satisfy
    |analytic - numeric| <= 1e-6 * max(|analytic|, |numeric|) + 1e-10,
a relative error of at most 1e-6, where the 1e-10 absolute term only absorbs the difference
formula's rounding noise (about 1e-12 here) on entries whose true gradient is zero.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import npgpt
from npgpt.gradcheck import numeric_grad  # fourth-order central differences
from npgpt.numpy_backend import layers as L

EPS = 1e-4
MAX_REL_ERR = 1e-6
NOISE = 1e-10


def check(name, f, x, analytic, rng, samples=12):
    """Compare analytic (same shape as x) with finite differences on sampled entries of x."""
    largest = np.argsort(-np.abs(analytic), axis=None)[:samples // 2]
    picked = np.union1d(largest, rng.choice(x.size, min(samples, x.size), replace=False))
    worst = 0.0
    for index in (np.unravel_index(i, x.shape) for i in picked):
        num, ana = numeric_grad(f, x, index, EPS), analytic[index]
        err = abs(ana - num)
        assert err <= MAX_REL_ERR * max(abs(ana), abs(num)) + NOISE, \
            f"{name}{list(map(int, index))}: analytic {ana:.12e}, numeric {num:.12e}"
        if err > NOISE:
            worst = max(worst, err / max(abs(ana), abs(num)))
    return worst


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def layer_case(rng, forward, backward, inputs, param_names=(), backward_params=()):
    """Check d/dinput and d/dparams of sum(forward(*inputs) * R)."""
    out, cache = forward(*inputs)
    R = rng.standard_normal(out.shape)
    grads = [np.zeros_like(inputs[i]) for i in backward_params]
    dx = backward(R.copy(), cache, *grads)
    f = lambda: float(np.sum(forward(*inputs)[0] * R))
    check("input", f, inputs[0], dx, rng)
    for i, g, name in zip(backward_params, grads, param_names):
        check(name, f, inputs[i], g, rng)


def test_linear(rng):
    x, w, b = rng.standard_normal((6, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    layer_case(rng, L.linear_forward, L.linear_backward, [x, w, b], ("weight", "bias"), (1, 2))


def test_layernorm(rng):
    x = rng.standard_normal((7, 8)) * 3 + 1
    w, b = rng.standard_normal(8), rng.standard_normal(8)
    layer_case(rng, L.layernorm_forward, L.layernorm_backward, [x, w, b], ("weight", "bias"), (1, 2))


def test_gelu(rng):
    x = rng.standard_normal((5, 9)) * 2
    layer_case(rng, L.gelu_forward, L.gelu_backward, [x])


def test_dropout_is_a_fixed_scaling(rng):
    x = rng.standard_normal((4, 6))
    mask = L.dropout_mask(rng, x.shape, 0.3, x.dtype)
    layer_case(rng, lambda x: L.dropout_forward(x, mask), L.dropout_backward, [x])


@pytest.mark.parametrize("n_heads, with_dropout", [(1, False), (3, False), (2, True)])
def test_attention(rng, n_heads, with_dropout):
    B, T, C = 2, 5, 6
    qkv = rng.standard_normal((B, T, 3 * C))
    mask = L.dropout_mask(rng, (B, n_heads, T, T), 0.25, qkv.dtype) if with_dropout else None
    layer_case(rng, lambda a: L.attention_forward(a, n_heads, mask), L.attention_backward, [qkv])


def test_attention_is_causal(rng):
    """Changing a later token must not change earlier outputs."""
    qkv = rng.standard_normal((1, 6, 12))
    y, _ = L.attention_forward(qkv, 2)
    qkv[:, 4:] += 1.0
    y2, _ = L.attention_forward(qkv, 2)
    np.testing.assert_array_equal(y[:, :4], y2[:, :4])


def test_cross_entropy(rng):
    logits = rng.standard_normal((6, 7))
    targets = rng.integers(0, 7, 6)
    loss, cache = L.cross_entropy_forward(logits.copy(), targets)
    dlogits = L.cross_entropy_backward(cache)
    f = lambda: L.cross_entropy_forward(logits.copy(), targets)[0]
    check("logits", f, logits, dlogits, rng, samples=20)
    # against the definition: mean of -log softmax at the target
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(6), targets])), rel=1e-12)


def test_embedding(rng):
    wte, wpe = rng.standard_normal((10, 4)), rng.standard_normal((8, 4))
    idx = np.array([[1, 3, 1], [9, 1, 0]])                  # a repeated id sums its gradients
    out, cache = L.embedding_forward(idx, wte, wpe)
    R = rng.standard_normal(out.shape)
    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    L.embedding_backward(R, cache, dwte, dwpe)
    f = lambda: float(np.sum(L.embedding_forward(idx, wte, wpe)[0] * R))
    for index in [(1, 0), (1, 3), (9, 2), (5, 1)]:
        assert dwte[index] == pytest.approx(numeric_grad(f, wte, index, EPS), rel=1e-8, abs=1e-10)
    for index in [(0, 0), (2, 3), (7, 1)]:
        assert dwpe[index] == pytest.approx(numeric_grad(f, wpe, index, EPS), rel=1e-8, abs=1e-10)


configs = st.builds(
    dict,
    n_layers=st.integers(1, 2), n_heads=st.integers(1, 4), head_dim=st.integers(2, 8),
    T=st.integers(1, 16), B=st.integers(1, 3), qkv_bias=st.booleans(), tie_weights=st.booleans(),
    drop_rate=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 2**16),
)


@settings(max_examples=30, deadline=None)
@given(configs)
def test_model_gradients(c):
    """The whole model, every parameter tensor, random small configs (dropout with fixed masks)."""
    emb = c["n_heads"] * c["head_dim"]
    if not 8 <= emb <= 32:
        emb = 8 * c["n_heads"]
    cfg = npgpt.GPTConfig(vocab_size=23, context_length=16, emb_dim=emb, n_heads=c["n_heads"],
                          n_layers=c["n_layers"], drop_rate=c["drop_rate"], qkv_bias=c["qkv_bias"],
                          tie_weights=c["tie_weights"])
    rng = np.random.default_rng(c["seed"])
    params = npgpt.init_params(cfg, seed=c["seed"], dtype="float64")
    for name, p in params.items():     # move off GPT-2's init so LayerNorm and biases have gradients
        p += rng.standard_normal(p.shape) * (0.3 if p.ndim == 1 else 0.05)
    model = npgpt.build_model(cfg, dtype="float64", params=params)
    masks = {}
    model.dropout_masks = lambda name, shape: masks.setdefault(name, rng.random(shape) >= cfg.drop_rate)
    x = rng.integers(0, cfg.vocab_size, (c["B"], c["T"]))
    y = rng.integers(0, cfg.vocab_size, (c["B"], c["T"]))
    _, grads = model.loss_and_grads(x, y)
    assert set(grads) == set(npgpt.param_shapes(cfg))
    for name in grads:
        p = model.p[name]          # perturb the model's own parameter buffer in place
        check(name, lambda: model.loss(x, y), p, grads[name], rng, samples=4)


def test_tied_head_sums_both_contributions(rng):
    """With a tied head, wte's gradient is the embedding's plus the head's."""
    cfg = npgpt.GPTConfig(vocab_size=17, context_length=8, emb_dim=8, n_heads=2, n_layers=1,
                          drop_rate=0.0, tie_weights=True)
    untied = npgpt.GPTConfig(**{**cfg.to_dict(), "tie_weights": False})
    params = npgpt.init_params(cfg, seed=1, dtype="float64")
    x, y = rng.integers(0, 17, (2, 8)), rng.integers(0, 17, (2, 8))
    _, g_tied = npgpt.build_model(cfg, dtype="float64", params=params).loss_and_grads(x, y)
    _, g_untied = npgpt.build_model(untied, dtype="float64",
                                    params={**params, "lm_head.weight": params["wte"]}).loss_and_grads(x, y)
    np.testing.assert_allclose(g_tied["wte"], g_untied["wte"] + g_untied["lm_head.weight"], rtol=1e-12, atol=1e-15)
