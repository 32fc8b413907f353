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
"""
from __future__ import annotations

import math

import numpy as np

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
    """Inverted dropout: keep with probability 1 - p and scale kept values by 1 / (1 - p)."""
    keep = rng.random(shape, dtype=np.float32) >= p
    return keep.astype(dtype) * dtype.type(1.0 / (1.0 - p))


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
    out = x @ w.T
    if b is not None:
        out += b
    return out, (x, w)


def linear_backward(dout, cache, dw, db=None):
    """dout (N, Cout) -> dx (N, Cin); writes dw (Cout, Cin) and db (Cout,)"""
    x, w = cache
    np.matmul(dout.T, x, out=dw)                      # (Cout, N) @ (N, Cin)
    if db is not None:
        np.sum(dout, axis=0, out=db)
    return dout @ w                                   # (N, Cout) @ (Cout, Cin)


# ---- LayerNorm -------------------------------------------------------------------------------

def layernorm_forward(x, w, b):
    """x (N, C) -> (x - mean) / sqrt(var + eps) * w + b, statistics over C"""
    mean = x.mean(axis=-1, keepdims=True)             # (N, 1)
    xhat = x - mean                                   # (N, C)
    var = np.mean(xhat * xhat, axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + LN_EPS)                # (N, 1)
    xhat *= rstd
    out = xhat * w
    out += b
    return out, (xhat, rstd, w)


def layernorm_backward(dout, cache, dw, db):
    """dout (N, C) -> dx (N, C); writes dw, db (C,)"""
    xhat, rstd, w = cache
    np.sum(dout * xhat, axis=0, out=dw)
    np.sum(dout, axis=0, out=db)
    dxhat = dout * w
    # xhat = (x - mean) * rstd: the mean and the variance both depend on every x in the row
    dx = dxhat - dxhat.mean(axis=-1, keepdims=True)
    dx -= xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True)
    dx *= rstd
    return dx


# ---- GELU, tanh form -------------------------------------------------------------------------

def gelu_forward(x):
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))"""
    t = np.tanh(GELU_K * (x + 0.044715 * x * x * x))
    out = 1.0 + t
    out *= x
    out *= 0.5
    return out, (x, t)


def gelu_backward(dout, cache):
    x, t = cache
    # d/dx: 0.5 * (1 + t) + 0.5 * x * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 * x^2)
    dinner = GELU_K * (1.0 + 3 * 0.044715 * x * x)
    dx = 1.0 - t * t
    dx *= x
    dx *= dinner
    dx += 1.0 + t
    dx *= 0.5
    dx *= dout
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
    att = q @ k.swapaxes(-1, -2)                                            # (B, NH, T, T)
    att *= 1.0 / math.sqrt(hs)
    att += causal_bias(T, att.dtype)
    softmax_inplace(att)
    att_d = att if att_mask is None else att * att_mask
    y = att_d @ v                                                           # (B, NH, T, hs)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)                            # (B, T, C)
    return y, (q, k, v, att, att_mask)


def attention_backward(dy, cache):
    """dy (B, T, C) -> dqkv (B, T, 3C)"""
    q, k, v, att, att_mask = cache
    B, NH, T, hs = q.shape
    dy = dy.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)                     # (B, NH, T, hs)
    att_d = att if att_mask is None else att * att_mask
    dqkv = np.empty((B, T, 3, NH, hs), dtype=dy.dtype)
    dqkv_heads = dqkv.transpose(2, 0, 3, 1, 4)                              # 3 x (B, NH, T, hs)
    dqkv_heads[2] = att_d.swapaxes(-1, -2) @ dy                             # y = att_d @ v
    datt = dy @ v.swapaxes(-1, -2)                                          # (B, NH, T, T)
    if att_mask is not None:
        datt *= att_mask
    # softmax: datt_pre = att * (datt - sum_j(att_j * datt_j)); masked entries have att = 0
    datt -= np.sum(att * datt, axis=-1, keepdims=True)
    datt *= att
    datt *= 1.0 / math.sqrt(hs)                                             # att_pre = q k^T / sqrt(hs)
    dqkv_heads[0] = datt @ k
    dqkv_heads[1] = datt.swapaxes(-1, -2) @ q
    return dqkv.reshape(B, T, 3 * NH * hs)


# ---- softmax cross-entropy -------------------------------------------------------------------

def cross_entropy_forward(logits, targets):
    """logits (N, V), targets (N,) -> mean of -log softmax(logits)[target].

    Works in place: logits is overwritten with the softmax probabilities, which are the cache
    (a (N, V) array over GPT-2's 50,257 tokens is the largest activation; no copy is made).
    """
    N = logits.shape[0]
    rows = np.arange(N)
    logits -= logits.max(axis=-1, keepdims=True)      # shift for stability
    target_logit = logits[rows, targets]              # (N,)
    probs = np.exp(logits, out=logits)
    total = probs.sum(axis=-1)                        # (N,)
    loss = float(np.mean(np.log(total) - target_logit, dtype=np.float64))
    probs /= total[:, None]
    return loss, (probs, targets)


def cross_entropy_backward(cache):
    """-> dlogits (N, V) = (softmax - onehot(target)) / N, again in place of the probabilities."""
    probs, targets = cache
    N = probs.shape[0]
    probs[np.arange(N), targets] -= 1.0
    probs *= 1.0 / N
    return probs
