"""GPT-2's layers in NumPy, each a forward/backward pair.

Shapes: B batch, T time (tokens), C channels (emb_dim), NH heads, hs head size (C // NH),
V vocabulary, N = B * T rows. Weights are in PyTorch's (out, in) layout, so a linear layer is
x @ w.T + b.

`<op>_forward(...)` returns (out, cache): the cache holds exactly what the backward needs.
`<op>_backward(dout, cache, ...)` returns the gradient of its input and writes the gradients
of its parameters into the arrays it is given (views into the model's one flat gradient buffer,
as llm.c does), so no parameter gradient is allocated and copied each step.
Apart from embedding_backward (which adds, so a tied head and the token embedding can share
wte's gradient), parameter gradients are overwritten, not accumulated.

The elementwise layers run their math on blocks of rows, `def rows(r): ...` applied to every
slice r of rows by threads.for_row_blocks: the same NumPy expressions as on whole arrays, but a
block stays in the L2 cache through all of them and the blocks run on every core. Attention runs
`def head(i): ...` for each head the same way, and matmul (threads.py) is `@` on every core.
"""
from __future__ import annotations

import math

import numpy as np

from .threads import for_row_blocks, matmul, parallel_map, uniform_float32

LN_EPS = 1e-5
GELU_K = math.sqrt(2.0 / math.pi)


# ---- embeddings: token + position ------------------------------------------------------------

def embedding_forward(idx, wte, wpe):
    """idx (B, T) int -> x (B, T, C) = wte[idx] + wpe[:T]"""
    T = idx.shape[1]
    out = wte[idx]                                    # (B, T, C)
    out += wpe[:T]
    return out, idx


def embedding_backward(dout, cache, dwte, dwpe):
    """Adds into dwte (a row per token id, summed over repeats) and writes dwpe[:T]."""
    idx = cache
    B, T, C = dout.shape
    np.add.at(dwte, idx.reshape(-1), dout.reshape(-1, C))
    dwpe[:T] = dout.sum(axis=0)                       # (T, C)
    dwpe[T:] = 0


# ---- dropout ---------------------------------------------------------------------------------

def dropout_mask(rng, shape, p, dtype):
    """Inverted dropout: keep with probability 1 - p and scale kept values by 1 / (1 - p).
    The uniform numbers are rng.random(shape, dtype=np.float32)'s, drawn on every core."""
    u = uniform_float32(rng, shape).reshape(-1)
    mask = u if dtype == np.float32 else np.empty(u.shape, dtype)   # float32: in place of u
    scale = dtype.type(1.0 / (1.0 - p))

    def rows(r):
        mask[r] = u[r] >= p
        mask[r] *= scale
    for_row_blocks(rows, u)
    return mask.reshape(shape)


def dropout_forward(x, mask):
    """mask is None (no dropout) or a scaled keep-mask from dropout_mask."""
    if mask is None:
        return x, None
    return x * mask, mask


def dropout_backward(dout, cache):
    mask = cache
    return dout if mask is None else dout * mask


# ---- linear ----------------------------------------------------------------------------------

def linear_forward(x, w, b=None):
    """x (N, Cin), w (Cout, Cin), b (Cout,) -> (N, Cout)"""
    out = matmul(x, w.T)
    if b is not None:
        for_row_blocks(lambda r: np.add(out[r], b, out=out[r]), out)
    return out, (x, w)


def linear_backward(dout, cache, dw, db=None):
    """dout (N, Cout) -> dx (N, Cin); writes dw (Cout, Cin) and db (Cout,)"""
    x, w = cache
    matmul(dout.T, x, out=dw)                         # (Cout, N) @ (N, Cin)
    if db is not None:                                # summed per block of rows, then over blocks
        np.sum(for_row_blocks(lambda r: np.sum(dout[r], axis=0), dout), axis=0, out=db)
    return matmul(dout, w)                            # (N, Cout) @ (Cout, Cin)


# ---- LayerNorm -------------------------------------------------------------------------------

def layernorm_forward(x, w, b):
    """x (N, C) -> (x - mean) / sqrt(var + eps) * w + b, statistics over C"""
    out, xhat = np.empty_like(x), np.empty_like(x)
    rstd = np.empty((len(x), 1), x.dtype)                             # (N, 1)

    def rows(r):
        np.subtract(x[r], x[r].mean(axis=-1, keepdims=True), out=xhat[r])
        var = np.mean(xhat[r] * xhat[r], axis=-1, keepdims=True)
        rstd[r] = 1.0 / np.sqrt(var + LN_EPS)
        xhat[r] *= rstd[r]
        np.add(xhat[r] * w, b, out=out[r])
    for_row_blocks(rows, x)
    return out, (xhat, rstd, w)


def layernorm_backward(dout, cache, dw, db):
    """dout (N, C) -> dx (N, C); writes dw, db (C,)"""
    xhat, rstd, w = cache
    dx = np.empty_like(dout)

    def rows(r):
        dxhat = dout[r] * w
        # xhat = (x - mean) * rstd: the mean and the variance both depend on every x in the row
        d = dxhat - dxhat.mean(axis=-1, keepdims=True)
        d -= xhat[r] * np.mean(dxhat * xhat[r], axis=-1, keepdims=True)
        np.multiply(d, rstd[r], out=dx[r])
        return np.sum(dout[r] * xhat[r], axis=0), np.sum(dout[r], axis=0)   # this block's dw, db
    partial = for_row_blocks(rows, dout)
    np.sum([dw_r for dw_r, _ in partial], axis=0, out=dw)
    np.sum([db_r for _, db_r in partial], axis=0, out=db)
    return dx


# ---- GELU, tanh form -------------------------------------------------------------------------

def gelu_forward(x):
    """x (N, 4C) -> 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))"""
    out, t = np.empty_like(x), np.empty_like(x)

    def rows(r):
        xr = x[r]
        np.tanh(GELU_K * (xr + 0.044715 * xr * xr * xr), out=t[r])
        np.multiply(0.5 * xr, 1.0 + t[r], out=out[r])
    for_row_blocks(rows, x)
    return out, (x, t)


def gelu_backward(dout, cache):
    x, t = cache
    dx = np.empty_like(dout)

    def rows(r):
        xr, tr = x[r], t[r]
        # d/dx: 0.5 * (1 + t) + 0.5 * x * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 * x^2)
        dinner = GELU_K * (1.0 + 3 * 0.044715 * xr * xr)
        np.multiply(dout[r], 0.5 * (1.0 + tr) + 0.5 * xr * (1.0 - tr * tr) * dinner, out=dx[r])
    for_row_blocks(rows, x)
    return dx


# ---- causal multi-head self-attention ---------------------------------------------------------

def causal_bias(T, dtype):
    """(T, T) additive mask: 0 where a query may look (key <= query), -inf above the diagonal."""
    return np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)


def softmax_inplace(x):
    """Row softmax over the last axis, overwriting x (rows that are all -inf are not expected)."""
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def attention_forward(qkv, n_heads, att_mask=None):
    """qkv (B, T, 3C) -> y (B, T, C): softmax(q k^T / sqrt(hs) + causal) [dropout] @ v, per head.

    att_mask is None or a scaled dropout mask of shape (B, NH, T, T) for the attention weights.
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_heads
    q, k, v = qkv.reshape(B, T, 3, n_heads, hs).transpose(2, 0, 3, 1, 4)    # 3 x (B, NH, T, hs)
    att = np.empty((B, n_heads, T, T), qkv.dtype)
    y = np.empty((B, T, n_heads, hs), qkv.dtype)                            # heads side by side
    bias = causal_bias(T, qkv.dtype)

    def head(i):                                                            # one head: b, h
        b, h = divmod(i, n_heads)
        a = np.matmul(q[b, h], k[b, h].T, out=att[b, h])                    # (T, T)
        a *= 1.0 / math.sqrt(hs)
        a += bias
        softmax_inplace(a)
        a_d = a if att_mask is None else a * att_mask[b, h]                 # dropout
        np.matmul(a_d, v[b, h], out=y[b, :, h])                             # (T, hs)
    parallel_map(head, range(B * n_heads))
    return y.reshape(B, T, C), (q, k, v, att, att_mask)


def attention_backward(dy, cache):
    """dy (B, T, C) -> dqkv (B, T, 3C)"""
    q, k, v, att, att_mask = cache
    B, NH, T, hs = q.shape
    dy = dy.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)                     # (B, NH, T, hs)
    dqkv = np.empty((B, T, 3, NH, hs), dtype=dy.dtype)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)                              # 3 x (B, NH, T, hs)

    def head(i):
        b, h = divmod(i, NH)
        a = att[b, h]
        a_d = a if att_mask is None else a * att_mask[b, h]
        np.matmul(a_d.T, dy[b, h], out=dv[b, h])                            # y = att_d @ v
        datt = dy[b, h] @ v[b, h].T                                         # (T, T)
        if att_mask is not None:
            datt *= att_mask[b, h]
        # softmax: datt_pre = att * (datt - sum_j(att_j * datt_j)); masked entries have att = 0
        datt -= np.sum(a * datt, axis=-1, keepdims=True)
        datt *= a
        datt *= 1.0 / math.sqrt(hs)                                         # att_pre = q k^T / sqrt(hs)
        np.matmul(datt, k[b, h], out=dq[b, h])
        np.matmul(datt.T, q[b, h], out=dk[b, h])
    parallel_map(head, range(B * NH))
    return dqkv.reshape(B, T, 3 * NH * hs)


# ---- softmax cross-entropy -------------------------------------------------------------------

def cross_entropy_forward(logits, targets):
    """logits (N, V), targets (N,) -> mean of -log softmax(logits)[target].

    Works in place: logits is overwritten with the softmax probabilities, which are the cache
    (a (N, V) array over GPT-2's 50,257 tokens is the largest activation; no copy is made).
    """
    loss = _softmax_cross_entropy(logits, targets, keep_probs=True)
    return loss, (logits, targets)                    # logits now hold the probabilities


def cross_entropy_loss(logits, targets):
    """The loss of cross_entropy_forward without its cache (evaluation): logits are overwritten."""
    return _softmax_cross_entropy(logits, targets, keep_probs=False)


def _softmax_cross_entropy(logits, targets, keep_probs):
    """Mean cross-entropy; overwrites logits with exp(logits - max), normalised when keep_probs."""
    losses = np.empty(len(logits), np.float64)        # (N,)

    def rows(r):
        z = logits[r]
        z -= z.max(axis=-1, keepdims=True)            # shift for stability
        target_logit = z[np.arange(len(z)), targets[r]]
        total = np.exp(z, out=z).sum(axis=-1)
        losses[r] = np.log(total) - target_logit      # -log(exp(z_target) / total)
        if keep_probs:
            z /= total[:, None]
    for_row_blocks(rows, logits)
    return float(np.mean(losses))


def cross_entropy_backward(cache):
    """-> dlogits (N, V) = (softmax - onehot(target)) / N, again in place of the probabilities."""
    probs, targets = cache
    N = probs.shape[0]

    def rows(r):
        p = probs[r]
        p[np.arange(len(p)), targets[r]] -= 1.0
        p *= 1.0 / N
    for_row_blocks(rows, probs)
    return probs
