"""The fast kernels of the NumPy backend (layers.py) against their reference twins (reference.py),
and their determinism: the same bits for any number of threads.

layers.py runs its elementwise math on blocks of rows on a thread pool (threads.py). Each kernel
is compared here with its twin in reference.py, the whole-array textbook form, in float64 and
float32, on odd shapes; the block sizes are shrunk so that even these small arrays are cut into
many blocks, with row counts that divide neither by the block count nor by the number of threads.
Row-wise math must give the same bits as the reference. Where the fast form adds in another order
the tolerance is derived from the dtype: sums over rows (LayerNorm's dweight, a bias gradient) are
summed per block, then over blocks, and a product cut into blocks is summed by BLAS per block; the
error of a sum of n terms is within n * eps * sum(|terms|), checked below with n the row count.
"""
import numpy as np
import pytest

import npgpt
from npgpt.numpy_backend import layers as L
from npgpt.numpy_backend import optim, threads
from npgpt.numpy_backend import reference as R

DTYPES = [np.float64, np.float32]
THREADS = [1, 2, 3]


def assert_sum_close(actual, expected, terms, n):
    """actual and expected are sums of the same n terms added in other orders: each entry within
    2 n eps * sum(|terms|), the bound on the rounding of a sum of n numbers (twice: one each)."""
    eps = np.finfo(actual.dtype).eps
    bound = 2 * n * eps * terms
    assert np.all(np.abs(actual.astype(np.float64) - expected) <= bound), \
        f"max difference {np.max(np.abs(actual - expected)):.3g}, bound {np.min(bound):.3g}"


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


# ---- the kernels against them ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(dtype, n_threads):
    rng = np.random.default_rng(6)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((13, 5), (11, 5), (11,)))
    dout = rng.standard_normal((13, 11)).astype(dtype)
    out, cache = L.linear_forward(x, w, b)
    ref_out, ref_cache = R.linear_forward(x, w, b)
    assert_sum_close(out, ref_out, np.abs(x) @ np.abs(w).T + np.abs(b), x.shape[1] + 1)
    dw, db = np.empty_like(w), np.empty_like(b)
    dx = L.linear_backward(dout, cache, dw, db)
    ref_dx, ref_dw, ref_db = R.linear_backward(dout, ref_cache)
    assert_sum_close(dx, ref_dx, np.abs(dout) @ np.abs(w), w.shape[0])
    assert_sum_close(dw, ref_dw, np.abs(dout).T @ np.abs(x), len(x))
    assert_sum_close(db, ref_db, np.abs(dout).sum(axis=0), len(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm(dtype, n_threads):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((13, 7)) * 3 + 1).astype(dtype)
    w, b, dout = rng.standard_normal(7).astype(dtype), rng.standard_normal(7).astype(dtype), \
        rng.standard_normal((13, 7)).astype(dtype)
    assert len(threads.row_blocks(x)) > n_threads
    out, cache = L.layernorm_forward(x, w, b)
    ref_out, ref_cache = R.layernorm_forward(x, w, b)
    np.testing.assert_array_equal(out, ref_out)
    for a, r in zip(cache, ref_cache):
        np.testing.assert_array_equal(a, r)
    dw, db = np.empty_like(w), np.empty_like(b)
    dx = L.layernorm_backward(dout, cache, dw, db)
    ref_dx, ref_dw, ref_db = R.layernorm_backward(dout, ref_cache)
    np.testing.assert_array_equal(dx, ref_dx)
    xhat = ref_cache[0]                                  # summed per block, then over the blocks
    assert_sum_close(dw, ref_dw, np.abs(dout * xhat).sum(axis=0), len(x))
    assert_sum_close(db, ref_db, np.abs(dout).sum(axis=0), len(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu(dtype, n_threads):
    rng = np.random.default_rng(1)
    x, dout = (rng.standard_normal((11, 9)) * 2).astype(dtype), rng.standard_normal((11, 9)).astype(dtype)
    out, (x_cached, t) = L.gelu_forward(x)
    ref_out, ref_cache = R.gelu_forward(x)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(t, ref_cache[1])
    np.testing.assert_array_equal(L.gelu_backward(dout, (x_cached, t)), R.gelu_backward(dout, ref_cache))


def attention_bounds(q, k, v, att, mask, dy, u):
    """Bounds on how far two float evaluations of attention may each be from the exact values, to
    first order in the unit roundoff u, from the reference's float64 intermediates (B, NH, T, ...):
    a sum of n terms is off by at most n u sum(|terms|) (and n u |q| |k| for a dot of n), a product
    or a division by u, exp and log by a few u. A row's weights are off by a relative rho: its
    scores' rounding (through exp), the row's max, sum and log-sum-exp. -> (y's, dqkv's)."""
    T, hs = q.shape[-2], q.shape[-1]
    aq, ak, av, ady = np.abs(q), np.abs(k), np.abs(v), np.abs(dy)
    scale = 1 / np.sqrt(hs)
    S = (aq @ ak.swapaxes(-1, -2)) * scale                     # |scores|, at most
    rho = u * ((2 * hs + 8) * S.max(axis=-1, keepdims=True) + T + 16 + 4 * np.log(T))   # (..., T, 1)
    am = att * mask
    err_y = (rho + (T + 1) * u) * (am @ av)
    err_dv = (am * (rho + (T + 1) * u)).swapaxes(-1, -2) @ ady
    D = ady @ av.swapaxes(-1, -2)                              # |dy v^T|
    err_datt = mask * (hs + 1) * u * D
    R = np.sum(am * D, axis=-1, keepdims=True)                 # |sum_j att_j datt_j|
    err_r = np.sum(att * (rho * mask * D + err_datt), axis=-1, keepdims=True) + T * u * R
    DS = att * (mask * D + R) * scale                          # |dscores|
    err_ds = (att * (rho * (mask * D + R) + err_datt + err_r) * scale + 3 * u * DS)
    err_dq = err_ds @ ak + T * u * (DS @ ak)
    err_dk = err_ds.swapaxes(-1, -2) @ aq + T * u * (DS.swapaxes(-1, -2) @ aq)
    return err_y, (err_dq, err_dk, err_dv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_dropout", [False, True])
def test_attention(dtype, with_dropout, n_threads, monkeypatch):
    """The fast attention recomputes the weights in its backward and skips the keys after a query
    block: its sums run in another order than the reference's, so each output is within twice the
    first-order rounding bound (attention_bounds: one for each form), in float32 and float64."""
    from npgpt.numpy_backend import softmax_layers
    monkeypatch.setattr(softmax_layers, "ATT_BLOCK", 4)       # T=19: 4 blocks of 4 queries and one of 3
    monkeypatch.setattr(softmax_layers, "ATT_ENTRIES", 2 * 4 * 19)   # heads in groups of 2 and 1
    rng = np.random.default_rng(2)
    B, T, NH, hs = 2, 19, 3, 8
    qkv = (2 * rng.standard_normal((B, T, 3 * NH * hs))).astype(dtype)
    dy = rng.standard_normal((B, T, NH * hs)).astype(dtype)
    mask = L.dropout_mask(rng, (B, NH, T, T), 0.3, np.dtype(dtype)) if with_dropout else None
    y, cache = L.attention_forward(qkv, NH, mask)
    ref_y, ref_cache = R.attention_forward(qkv, NH, mask)
    dqkv, ref_dqkv = L.attention_backward(dy, cache), R.attention_backward(dy, ref_cache)
    q, k, v, att, _ = (None if a is None else a.astype(np.float64) for a in ref_cache)
    dy_heads = np.moveaxis(dy.astype(np.float64).reshape(B, T, NH, hs), 1, 2)
    err_y, err_d = attention_bounds(q, k, v, att, 1.0 if mask is None else mask.astype(np.float64), dy_heads,
                                    np.finfo(dtype).eps / 2)
    err_y = np.moveaxis(err_y, 1, 2).reshape(y.shape)
    err_d = np.moveaxis(np.stack(err_d), (0, 2), (2, 3)).reshape(dqkv.shape)   # as dqkv: (B, T, 3, NH, hs)
    for name, got, want, err in (("y", y, ref_y, err_y), ("dqkv", dqkv, ref_dqkv, err_d)):
        diff = np.abs(got.astype(np.float64) - want)
        assert np.all(diff <= 2 * err), f"{name}: max difference {diff.max():.3g}, " \
            f"where the bound is {2 * err.flat[np.argmax(diff - 2 * err)]:.3g}"
    assert cache[3].shape == (B, NH, T)                         # the cache: a log-sum-exp per row
    np.testing.assert_allclose(cache[3], np.log(np.sum(np.exp(                            # of the scores
        np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(hs) + R.causal_bias(T, np.float64)), axis=-1)),
        rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax(dtype, n_threads):
    rng = np.random.default_rng(8)
    z = (rng.standard_normal((3, 4, 9)) * 3).astype(dtype)
    z[..., -2:] = -np.inf                                    # masked entries, as the causal mask makes
    np.testing.assert_array_equal(L.softmax_inplace(z.copy()), R.softmax_forward(z)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy(dtype, n_threads):
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((17, 11)) * 4).astype(dtype)
    targets = rng.integers(0, 11, 17)
    ref_loss, ref_cache = R.cross_entropy_forward(logits, targets)
    loss, (probs, cached_targets) = L.cross_entropy_forward(logits.copy(), targets)
    assert loss == pytest.approx(ref_loss, rel=1e-15)       # both average float64 losses, in other orders
    np.testing.assert_array_equal(probs, ref_cache[0])
    np.testing.assert_array_equal(L.cross_entropy_backward((probs, cached_targets)),
                                  R.cross_entropy_backward(ref_cache))
    assert L.cross_entropy_loss(logits.copy(), targets) == pytest.approx(ref_loss, rel=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tied", [False, True])
def test_embedding(dtype, tied, n_threads):
    rng = np.random.default_rng(10)
    V, Tmax, C = 6, 9, 5
    idx = rng.integers(0, V, (3, 7))                         # ids repeat: 21 positions, 6 tokens
    wte, wpe = rng.standard_normal((V, C)).astype(dtype), rng.standard_normal((Tmax, C)).astype(dtype)
    dout = rng.standard_normal((3, 7, C)).astype(dtype)
    out, cache = L.embedding_forward(idx, wte, wpe)
    ref_out, ref_cache = R.embedding_forward(idx, wte, wpe)
    np.testing.assert_array_equal(out, ref_out)
    head = rng.standard_normal((V, C)).astype(dtype) if tied else np.zeros((V, C), dtype)
    dwte, dwpe = head.copy(), np.full((Tmax, C), np.nan, dtype)   # the fast form adds into dwte
    L.embedding_backward(dout, cache, dwte, dwpe)
    ref_dwte, ref_dwpe = R.embedding_backward(dout, ref_cache)
    np.testing.assert_array_equal(dwpe, ref_dwpe)
    if tied:     # head + (g1 + g2 ...) in the reference, (head + g1) + g2 ... in the fast form
        terms = np.abs(head) + np.abs(ref_dwte)
        assert_sum_close(dwte, head + ref_dwte, terms, idx.size + 1)
    else:
        np.testing.assert_array_equal(dwte, ref_dwte)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout(dtype, n_threads):
    rng = np.random.default_rng(12)
    x, dout = rng.standard_normal((2, 3, 8)).astype(dtype), rng.standard_normal((2, 3, 8)).astype(dtype)
    mask = R.dropout_mask(np.random.default_rng(1), x.shape, 0.4, dtype)
    out, cache = L.dropout_forward(x, mask)
    np.testing.assert_array_equal(out, R.dropout_forward(x, mask)[0])
    np.testing.assert_array_equal(L.dropout_backward(dout, cache), R.dropout_backward(dout, mask))
    assert L.dropout_forward(x, None)[0] is x and L.dropout_backward(dout, None) is dout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 3, 9, 9), (4, 1)])
def test_dropout_mask_is_the_plain_expression(dtype, shape, n_threads):
    """The same mask, and the same RNG state after it, as the reference's rng.random(...) >= p scaled,
    whether the numbers are drawn on one thread or in jumped-ahead blocks."""
    p = 0.25
    for start in (0, 1):                                     # 1: a half-used 64-bit output first
        rng, ref_rng = np.random.default_rng(7), np.random.default_rng(7)
        rng.random(start, dtype=np.float32), ref_rng.random(start, dtype=np.float32)
        mask = L.dropout_mask(rng, shape, p, np.dtype(dtype))
        ref = R.dropout_mask(ref_rng, shape, p, dtype)
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

@pytest.mark.parametrize("decay", ["all", "matrices", "none"])
def test_adamw_chunks_equal_one_update(decay, n_threads):
    """The chunked, threaded AdamW step equals adamw_update on whole buffers."""
    cfg = npgpt.GPTConfig(vocab_size=31, context_length=8, emb_dim=8, n_heads=2, n_layers=2, qkv_bias=True)
    model = npgpt.build_model(cfg, dtype="float32")
    rng = np.random.default_rng(5)
    opt = npgpt.AdamW(model, lr=1e-2, weight_decay=0.1, decay=decay)
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
