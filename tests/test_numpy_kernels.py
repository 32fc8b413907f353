"""The blocked, threaded kernels of the NumPy backend against the plain NumPy expressions they
replace, and their determinism: the same bits for any number of threads.

layers.py runs its elementwise math on blocks of rows on a thread pool (threads.py). Each kernel
is compared here with the whole-array expression it replaced (the reference functions below), in
float64 and float32, on odd shapes; the block sizes are shrunk so that even these small arrays are
cut into many blocks, with row counts that divide neither by the block count nor by the number
of threads. Row-wise math must give the same bits as the reference; sums over rows (LayerNorm's
dweight, dbias) are summed per block and may differ in the last bits only.
"""
import math

import numpy as np
import pytest

import npgpt
from npgpt.numpy_backend import layers as L
from npgpt.numpy_backend import optim, threads

DTYPES = [np.float64, np.float32]
THREADS = [1, 2, 3]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 48 bytes, and every product cut in column or row blocks: a (13, 7) float32
    array is already cut into 7 blocks."""
    monkeypatch.setattr(threads, "BLOCK_BYTES", 48)
    monkeypatch.setattr(threads, "MATMUL_MIN_MACS", 1)
    monkeypatch.setattr(threads, "RANDOM_BLOCK", 64)
    monkeypatch.setattr(optim, "CHUNK_BYTES", 256)
    before = threads.num_threads()
    yield
    threads.set_num_threads(before)


@pytest.fixture(params=THREADS)
def n_threads(request):
    threads.set_num_threads(request.param)
    return request.param


# ---- the whole-array expressions the kernels replaced ------------------------------------------

def ref_layernorm_forward(x, w, b):
    mean = x.mean(axis=-1, keepdims=True)
    xhat = x - mean
    var = np.mean(xhat * xhat, axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + L.LN_EPS)
    xhat *= rstd
    return xhat * w + b, (xhat, rstd, w)


def ref_layernorm_backward(dout, cache):
    xhat, rstd, w = cache
    dxhat = dout * w
    dx = dxhat - dxhat.mean(axis=-1, keepdims=True)
    dx -= xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True)
    return dx * rstd, np.sum(dout * xhat, axis=0), np.sum(dout, axis=0)


def ref_gelu_forward(x):
    t = np.tanh(L.GELU_K * (x + 0.044715 * x * x * x))
    out = 1.0 + t
    out *= x
    out *= 0.5
    return out, t


def ref_gelu_backward(dout, x, t):
    dinner = L.GELU_K * (1.0 + 3 * 0.044715 * x * x)
    dx = 1.0 - t * t
    dx *= x
    dx *= dinner
    dx += 1.0 + t
    dx *= 0.5
    return dx * dout


def ref_attention(qkv, n_heads, att_mask, dy):
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_heads
    q, k, v = qkv.reshape(B, T, 3, n_heads, hs).transpose(2, 0, 3, 1, 4)
    att = q @ k.swapaxes(-1, -2)
    att *= 1.0 / math.sqrt(hs)
    att += L.causal_bias(T, att.dtype)
    att -= att.max(axis=-1, keepdims=True)
    np.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    att_d = att if att_mask is None else att * att_mask
    y = (att_d @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    dy = dy.reshape(B, T, n_heads, hs).transpose(0, 2, 1, 3)
    dqkv = np.empty((B, T, 3, n_heads, hs), dtype=dy.dtype)
    heads = dqkv.transpose(2, 0, 3, 1, 4)
    heads[2] = att_d.swapaxes(-1, -2) @ dy
    datt = dy @ v.swapaxes(-1, -2)
    if att_mask is not None:
        datt *= att_mask
    datt -= np.sum(att * datt, axis=-1, keepdims=True)
    datt *= att
    datt *= 1.0 / math.sqrt(hs)
    heads[0] = datt @ k
    heads[1] = datt.swapaxes(-1, -2) @ q
    return y, att, dqkv.reshape(B, T, C3)


def ref_cross_entropy(logits, targets):
    N = len(logits)
    z = logits - logits.max(axis=-1, keepdims=True)
    target_logit = z[np.arange(N), targets]
    probs = np.exp(z)
    total = probs.sum(axis=-1)
    loss = float(np.mean(np.log(total) - target_logit, dtype=np.float64))
    probs /= total[:, None]
    dlogits = probs.copy()
    dlogits[np.arange(N), targets] -= 1.0
    dlogits *= 1.0 / N
    return loss, probs, dlogits


# ---- the kernels against them ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(dtype, n_threads):
    rng = np.random.default_rng(6)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((13, 5), (11, 5), (11,)))
    dout = rng.standard_normal((13, 11)).astype(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)
    out, cache = L.linear_forward(x, w, b)
    np.testing.assert_allclose(out, x @ w.T + b, **tol)
    dw, db = np.empty_like(w), np.empty_like(b)
    np.testing.assert_allclose(L.linear_backward(dout, cache, dw, db), dout @ w, **tol)
    np.testing.assert_allclose(dw, dout.T @ x, **tol)
    np.testing.assert_allclose(db, dout.sum(axis=0), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm(dtype, n_threads):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((13, 7)) * 3 + 1).astype(dtype)
    w, b, dout = rng.standard_normal(7).astype(dtype), rng.standard_normal(7).astype(dtype), \
        rng.standard_normal((13, 7)).astype(dtype)
    assert len(threads.row_blocks(x)) > n_threads
    out, cache = L.layernorm_forward(x, w, b)
    ref_out, ref_cache = ref_layernorm_forward(x, w, b)
    np.testing.assert_array_equal(out, ref_out)
    for a, r in zip(cache, ref_cache):
        np.testing.assert_array_equal(a, r)
    dw, db = np.empty_like(w), np.empty_like(b)
    dx = L.layernorm_backward(dout, cache, dw, db)
    ref_dx, ref_dw, ref_db = ref_layernorm_backward(dout, ref_cache)
    np.testing.assert_array_equal(dx, ref_dx)
    rtol = 1e-14 if dtype == np.float64 else 1e-6        # summed per block, then over the blocks
    np.testing.assert_allclose(dw, ref_dw, rtol=rtol, atol=rtol * np.abs(ref_dw).max())
    np.testing.assert_allclose(db, ref_db, rtol=rtol, atol=rtol * np.abs(ref_db).max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu(dtype, n_threads):
    rng = np.random.default_rng(1)
    x, dout = (rng.standard_normal((11, 9)) * 2).astype(dtype), rng.standard_normal((11, 9)).astype(dtype)
    out, (x_cached, t) = L.gelu_forward(x)
    ref_out, ref_t = ref_gelu_forward(x)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(t, ref_t)
    np.testing.assert_array_equal(L.gelu_backward(dout, (x_cached, t)), ref_gelu_backward(dout, x, ref_t))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_dropout", [False, True])
def test_attention(dtype, with_dropout, n_threads):
    rng = np.random.default_rng(2)
    B, T, NH, hs = 3, 7, 5, 2                                # 15 heads in blocks of 1 or 2
    qkv = rng.standard_normal((B, T, 3 * NH * hs)).astype(dtype)
    dy = rng.standard_normal((B, T, NH * hs)).astype(dtype)
    mask = L.dropout_mask(rng, (B, NH, T, T), 0.3, np.dtype(dtype)) if with_dropout else None
    y, cache = L.attention_forward(qkv, NH, mask)
    ref_y, ref_att, ref_dqkv = ref_attention(qkv, NH, mask, dy)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(cache[3], ref_att)
    np.testing.assert_array_equal(L.attention_backward(dy, cache), ref_dqkv)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy(dtype, n_threads):
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((17, 11)) * 4).astype(dtype)
    targets = rng.integers(0, 11, 17)
    ref_loss, ref_probs, ref_dlogits = ref_cross_entropy(logits, targets)
    loss, (probs, cached_targets) = L.cross_entropy_forward(logits.copy(), targets)
    assert loss == pytest.approx(ref_loss, rel=1e-15)
    np.testing.assert_array_equal(probs, ref_probs)
    np.testing.assert_array_equal(L.cross_entropy_backward((probs, cached_targets)), ref_dlogits)
    assert L.cross_entropy_loss(logits.copy(), targets) == pytest.approx(ref_loss, rel=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 3, 9, 9), (4, 1)])
def test_dropout_mask_is_the_plain_expression(dtype, shape, n_threads):
    """The same mask, and the same RNG state after it, as rng.random(...) >= p scaled, whether the
    numbers are drawn on one thread or in jumped-ahead blocks."""
    p = 0.25
    for start in (0, 1):                                     # 1: a half-used 64-bit output first
        rng, ref_rng = np.random.default_rng(7), np.random.default_rng(7)
        rng.random(start, dtype=np.float32), ref_rng.random(start, dtype=np.float32)
        mask = L.dropout_mask(rng, shape, p, np.dtype(dtype))
        ref = (ref_rng.random(shape, dtype=np.float32) >= p).astype(dtype) * dtype(1.0 / (1.0 - p))
        assert mask.dtype == dtype and mask.shape == shape
        np.testing.assert_array_equal(mask, ref)
        assert rng.bit_generator.state == ref_rng.bit_generator.state


@pytest.mark.parametrize("size", [2, 64, 130, 1000, 1001])
def test_uniform_float32_draws_rng_random_numbers(size, n_threads):
    rng, ref_rng = np.random.default_rng(11), np.random.default_rng(11)
    for _ in range(3):                                       # consecutive calls continue the stream
        np.testing.assert_array_equal(threads.uniform_float32(rng, (size,)), ref_rng.random(size, dtype=np.float32))
        assert rng.bit_generator.state == ref_rng.bit_generator.state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, K, N", [(13, 5, 7), (3, 6, 29), (1, 9, 30), (17, 4, 1)])
def test_matmul_in_blocks(dtype, M, K, N, n_threads):
    """Column blocks (wide outputs) or row blocks (tall ones), into a given output or a new one,
    from transposed views as the linear layers pass them: a @ b to rounding."""
    rng = np.random.default_rng(4)
    a, w = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((N, K)).astype(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(threads.matmul(a, w.T), a @ w.T, **tol)
    out = np.full((N, K), np.nan, dtype)
    d = rng.standard_normal((M, N)).astype(dtype)
    assert threads.matmul(d.T, a, out=out) is out
    np.testing.assert_allclose(out, d.T @ a, **tol)
    blocks = threads.matmul(d, w)
    threads.set_num_threads(1)
    np.testing.assert_array_equal(threads.matmul(d, w), blocks)   # the same bits on one thread


def test_parallel_map_keeps_order_and_raises(n_threads):
    assert threads.parallel_map(lambda i: i * i, range(50)) == [i * i for i in range(50)]
    assert threads.parallel_map(lambda i: i, []) == []

    def fails(i):
        if i == 7:
            raise ValueError("block 7")
        return i
    with pytest.raises(ValueError, match="block 7"):
        threads.parallel_map(fails, range(20))


def test_row_blocks_cover_the_rows_and_ignore_the_thread_count():
    for rows in (1, 5, 13, 64, 97):
        x = np.zeros((rows, 3))
        blocks = threads.row_blocks(x)
        assert np.array_equal(np.concatenate([np.arange(rows)[b] for b in blocks]), np.arange(rows))
        threads.set_num_threads(1)
        assert threads.row_blocks(x) == blocks
    assert threads.row_blocks(np.zeros((0, 3))) == [slice(0, 0)]
    with pytest.raises(ValueError, match="positive integer"):
        threads.set_num_threads(0)


# ---- whole steps: the same bits for any number of threads --------------------------------------

@pytest.mark.parametrize("decay_all", [True, False])
def test_adamw_chunks_equal_one_update(decay_all, n_threads):
    """The chunked, threaded AdamW step equals adamw_update on whole buffers."""
    cfg = npgpt.GPTConfig(vocab_size=31, context_length=8, emb_dim=8, n_heads=2, n_layers=2, qkv_bias=True)
    model = npgpt.build_model(cfg, dtype="float32")
    rng = np.random.default_rng(5)
    opt = npgpt.AdamW(model, lr=1e-2, weight_decay=0.1, decay_all=decay_all)
    assert len(opt._chunks) > 10
    p, m, v = model.flat_params.copy(), np.zeros_like(model.flat_params), np.zeros_like(model.flat_params)
    decayed = [(s, s + r[1] - r[0]) for start, _, ranges in opt._chunks for r in ranges for s in [start + r[0]]]
    for t in range(1, 4):
        model.flat_grads[:] = rng.standard_normal(model.flat_grads.size).astype(np.float32)
        opt.step()
        optim.adamw_update(p, model.flat_grads, m, v, np.empty_like(p), 1e-2, 0.9, 0.999, 1e-8, t,
                           1.0 - 1e-2 * 0.1, decayed)
        np.testing.assert_array_equal(model.flat_params, p)
        np.testing.assert_array_equal(opt.exp_avg, m)
        np.testing.assert_array_equal(opt.exp_avg_sq, v)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_training_steps_are_the_same_for_any_thread_count(dtype):
    """Two train steps with dropout from the model's RNG: identical losses, parameters, moments
    and RNG state with 1, 2 and 3 threads."""
    cfg = npgpt.GPTConfig(vocab_size=37, context_length=12, emb_dim=12, n_heads=3, n_layers=2, drop_rate=0.2)
    x, y = np.random.default_rng(9).integers(0, 37, (2, 3, 12))
    results = []
    for n in THREADS:
        threads.set_num_threads(n)
        model = npgpt.build_model(cfg, dtype=dtype, seed=4)
        opt = npgpt.AdamW(model, lr=1e-3)
        losses = [model.train_step(x, y, opt) for _ in range(2)]
        results.append((losses, model.flat_params.copy(), opt.exp_avg_sq.copy(), model.rng_state()))
    for losses, params, moments, rng_state in results[1:]:
        assert losses == results[0][0]
        np.testing.assert_array_equal(params, results[0][1])
        np.testing.assert_array_equal(moments, results[0][2])
        assert rng_state == results[0][3]
