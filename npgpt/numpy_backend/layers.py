"""GPT-2's layers in NumPy, fast: read reference.py first.

reference.py is the textbook form of every layer, one idea per line and every backward derived;
this file is the same math made fast, function by function under the same names (each docstring
names its twin), and tests/test_numpy_kernels.py proves each equal to its twin.

Shapes: B batch, T time (tokens), C channels (emb_dim), NH heads, hs head size (C // NH),
V vocabulary, N = B * T rows; `...` is any number of leading axes. Every function takes the shapes
its twin takes: the per-row layers (linear, LayerNorm, GELU, dropout, cross-entropy) any
(..., C), embedding (..., T) ids and attention (..., T, 3C). Each works on a reshape of its
input to the (N, C) rows, or to one batch axis (a view: no copy for a contiguous array, and the
model's (N, C) arrays pass through unchanged), and returns the caller's leading shape. A shape
that does not fit raises ValueError naming the argument and the shape expected. Weights are in
PyTorch's (out, in) layout, so a linear layer is x @ w.T + b.

`<op>_forward(...)` returns (out, cache): the cache holds exactly what the backward needs.
`<op>_backward(dout, cache, ...)` returns the gradient of its input and writes the gradients
of its parameters into the arrays it is given (views into the model's one flat gradient buffer,
as llm.c does), so no parameter gradient is allocated and copied each step.
Apart from embedding_backward (which adds, so a tied head and the token embedding can share
wte's gradient), parameter gradients are overwritten, not accumulated.

No function writes into an argument the caller holds unless the first line of its docstring
says "in place": the gradient arrays a backward is given; dropout_mask's rng, which it advances;
softmax_inplace's x; and cross-entropy, which overwrites the logits with the probabilities and
then with dlogits. At GPT-2's 50,257 tokens the (N, V) logits are the largest activation, and
the model's own, so it keeps no copy of them: pass a copy to keep yours.

The elementwise layers run their math on blocks of rows, `def rows(r): ...` applied to every
slice r of rows by threads.for_row_blocks: the same NumPy expressions as on whole arrays, but a
block stays in the L2 cache through all of them and the blocks run on every core. Attention runs
`def head(i): ...` for each head the same way, and matmul (threads.py) is `@` on every core.
"""
from __future__ import annotations

import math

import numpy as np

from .reference import GELU_K, LN_EPS, causal_bias     # one copy of the constants
from .threads import for_row_blocks, matmul, parallel_map, uniform_float32


def _shape_error(name, expected, a):
    return ValueError(f"{name}: expected shape {expected}, got {np.shape(a)}")


def _rows(a, name, expected="(..., C)"):
    """a (..., C) -> its (N, C) view (a reshape: no copy for a contiguous array, none at all for
    an (N, C) one). A non-contiguous a is copied, which is fine where a is only read."""
    if np.ndim(a) < 1:
        raise _shape_error(name, expected, a)
    return a.reshape(-1, a.shape[-1])


def _entries(a):
    """_rows for math entry by entry, which also takes a 0-d a: as one (1, 1) row."""
    return a.reshape(-1, a.shape[-1]) if np.ndim(a) else np.reshape(a, (1, 1))


def _rows_in_place(a, name, expected):
    """_rows for an array that is overwritten in place: a copy would leave the caller's unchanged."""
    r = _rows(a, name, expected)
    if r.size and not np.may_share_memory(r, a):
        raise ValueError(f"{name}: expected an array whose (N, V) rows are a view of it, as it is "
                         f"overwritten in place (a contiguous one); got shape {a.shape}, "
                         f"strides {a.strides}")
    return r


# ---- embeddings: token + position ------------------------------------------------------------

def embedding_forward(idx, wte, wpe):
    """idx (..., T) int -> x (..., T, C) = wte[idx] + wpe[:T]. Twin: reference.embedding_forward."""
    if np.ndim(idx) < 1 or idx.shape[-1] > len(wpe):
        raise _shape_error("idx", f"(..., T) with T <= {len(wpe)} (the rows of wpe)", idx)
    T = idx.shape[-1]
    out = wte[idx]                                    # (..., T, C)
    out += wpe[:T]
    return out, idx


def embedding_backward(dout, cache, dwte, dwpe):
    """Adds into dwte and writes dwpe in place (a row of dwte per token id, summed over repeats).

    dout (..., T, C), dwte (V, C), dwpe (context_length, C). Twin: reference.embedding_backward."""
    idx = cache
    if np.ndim(dwte) != 2:
        raise _shape_error("dwte", "(V, C)", dwte)
    C, T = dwte.shape[1], idx.shape[-1]
    if np.shape(dout) != (*idx.shape, C):
        raise _shape_error("dout", f"the ids' shape + (C,) = {(*idx.shape, C)}", dout)
    if np.ndim(dwpe) != 2 or dwpe.shape[0] < T or dwpe.shape[1] != C:
        raise _shape_error("dwpe", f"(context_length, {C}) with context_length >= {T}", dwpe)
    np.add.at(dwte, idx.reshape(-1), dout.reshape(-1, C))
    dwpe[:T] = dout.reshape(-1, T, C).sum(axis=0)     # (T, C): summed over the batch
    dwpe[T:] = 0


# ---- dropout ---------------------------------------------------------------------------------

def dropout_mask(rng, shape, p, dtype=np.float32):
    """Advances rng in place, as rng.random(shape) does -> the scaled keep-mask (shape) of dropout.

    Inverted dropout: keep with probability 1 - p and scale kept values by 1 / (1 - p).
    The uniform numbers are rng.random(shape, dtype=np.float32)'s, drawn on every core.
    Twin: reference.dropout_mask."""
    dtype = np.dtype(dtype)
    u = uniform_float32(rng, shape).reshape(-1)
    mask = u if dtype == np.float32 else np.empty(u.shape, dtype)   # float32: in place of u
    scale = dtype.type(1.0 / (1.0 - p))

    def rows(r):
        mask[r] = u[r] >= p
        mask[r] *= scale
    for_row_blocks(rows, u)
    return mask.reshape(shape)


def dropout_forward(x, mask):
    """x (...), mask (same shape) or None (no dropout) -> x * mask. Twin: reference.dropout_forward.

    mask is a scaled keep-mask from dropout_mask."""
    if mask is not None and np.shape(mask) != np.shape(x):
        raise _shape_error("mask", f"x's {np.shape(x)}", mask)
    if mask is None:
        return x, None
    return x * mask, mask


def dropout_backward(dout, cache):
    """dout (...) -> dx (...) = dout * mask. Twin: reference.dropout_backward."""
    mask = cache
    if mask is not None and np.shape(dout) != np.shape(mask):
        raise _shape_error("dout", f"the mask's {np.shape(mask)}", dout)
    return dout if mask is None else dout * mask


# ---- linear ----------------------------------------------------------------------------------

def linear_forward(x, w, b=None):
    """x (..., Cin), w (Cout, Cin), b (Cout,) or None -> (..., Cout). Twin: reference.linear_forward."""
    if np.ndim(w) != 2:
        raise _shape_error("w", "(Cout, Cin)", w)
    Cout, Cin = w.shape
    if np.ndim(x) < 1 or x.shape[-1] != Cin:
        raise _shape_error("x", f"(..., {Cin})", x)
    if b is not None and np.shape(b) != (Cout,):
        raise _shape_error("b", f"({Cout},)", b)
    x_rows = _rows(x, "x")                            # (N, Cin)
    out = matmul(x_rows, w.T)
    if b is not None:
        for_row_blocks(lambda r: np.add(out[r], b, out=out[r]), out)
    return out.reshape(*x.shape[:-1], Cout), (x_rows, w)


def linear_backward(dout, cache, dw, db=None):
    """Writes dw (Cout, Cin) and db (Cout,) in place; dout (..., Cout) -> dx (..., Cin).

    Twin: reference.linear_backward."""
    x, w = cache
    Cout, Cin = w.shape
    if np.ndim(dout) < 1 or dout.shape[-1] != Cout or dout.size // Cout != x.size // Cin:
        raise _shape_error("dout", f"(..., {Cout}) with {x.size // Cin} rows", dout)
    if np.shape(dw) != (Cout, Cin):
        raise _shape_error("dw", f"({Cout}, {Cin})", dw)
    if db is not None and np.shape(db) != (Cout,):
        raise _shape_error("db", f"({Cout},)", db)
    dout_rows, x = _rows(dout, "dout"), x.reshape(-1, Cin)           # (N, Cout), (N, Cin)
    matmul(dout_rows.T, x, out=dw)                    # (Cout, N) @ (N, Cin)
    if db is not None:                                # summed per block of rows, then over blocks
        np.sum(for_row_blocks(lambda r: np.sum(dout_rows[r], axis=0), dout_rows), axis=0, out=db)
    return matmul(dout_rows, w).reshape(*dout.shape[:-1], Cin)       # (N, Cout) @ (Cout, Cin)


# ---- LayerNorm -------------------------------------------------------------------------------

def layernorm_forward(x, w, b=None):
    """x (..., C), w (C,), b (C,) or None -> (x - mean) / sqrt(var + eps) * w + b, statistics over C.

    Twin: reference.layernorm_forward."""
    x_in = x
    x = _rows(x, "x")                                                 # (N, C)
    C = x.shape[1]
    if np.shape(w) != (C,):
        raise _shape_error("w", f"({C},)", w)
    if b is not None and np.shape(b) != (C,):
        raise _shape_error("b", f"({C},)", b)
    out, xhat = np.empty_like(x), np.empty_like(x)
    rstd = np.empty((len(x), 1), x.dtype)                             # (N, 1)

    def rows(r):
        np.subtract(x[r], x[r].mean(axis=-1, keepdims=True), out=xhat[r])
        var = np.mean(xhat[r] * xhat[r], axis=-1, keepdims=True)
        rstd[r] = 1.0 / np.sqrt(var + LN_EPS)
        xhat[r] *= rstd[r]
        np.multiply(xhat[r], w, out=out[r])
        if b is not None:
            out[r] += b
    for_row_blocks(rows, x)
    lead = x_in.shape[:-1]
    return out.reshape(*lead, C), (xhat.reshape(*lead, C), rstd.reshape(*lead, 1), w, b is not None)


def layernorm_backward(dout, cache, dw, db=None):
    """Writes dw, db (C,) in place (db None: the forward had no bias); dout (..., C) -> dx (..., C).

    Twin: reference.layernorm_backward."""
    xhat, rstd, w, has_bias = cache
    C = w.shape[0]
    if np.ndim(dout) < 1 or dout.shape[-1] != C or dout.size != xhat.size:
        raise _shape_error("dout", f"(..., {C}) with {xhat.size // C} rows", dout)
    if np.shape(dw) != (C,):
        raise _shape_error("dw", f"({C},)", dw)
    if has_bias != (db is not None) or (has_bias and np.shape(db) != (C,)):
        raise _shape_error("db", f"({C},)", db)
    dout_in = dout
    dout, xhat, rstd = _rows(dout, "dout"), xhat.reshape(-1, C), rstd.reshape(-1, 1)
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
    if has_bias:
        np.sum([db_r for _, db_r in partial], axis=0, out=db)
    return dx.reshape(dout_in.shape)


# ---- GELU, tanh form -------------------------------------------------------------------------

def gelu_forward(x):
    """x (..., 4C) -> 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), entry by entry.

    Twin: reference.gelu_forward."""
    shape = np.shape(x)
    x = _entries(x)                                                   # (N, 4C)
    out, t = np.empty_like(x), np.empty_like(x)

    def rows(r):
        xr = x[r]
        np.tanh(GELU_K * (xr + 0.044715 * xr * xr * xr), out=t[r])
        np.multiply(0.5 * xr, 1.0 + t[r], out=out[r])
    for_row_blocks(rows, x)
    return out.reshape(shape), (x.reshape(shape), t.reshape(shape))


def gelu_backward(dout, cache):
    """dout (..., 4C) -> dx (..., 4C), from the cached x and tanh. Twin: reference.gelu_backward."""
    x, t = cache
    if np.shape(dout) != np.shape(x):
        raise _shape_error("dout", f"x's {np.shape(x)}", dout)
    shape = dout.shape
    dout, x, t = _entries(dout), _entries(x), _entries(t)
    dx = np.empty_like(dout)

    def rows(r):
        xr, tr = x[r], t[r]
        # d/dx: 0.5 * (1 + t) + 0.5 * x * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 * x^2)
        dinner = GELU_K * (1.0 + 3 * 0.044715 * xr * xr)
        np.multiply(dout[r], 0.5 * (1.0 + tr) + 0.5 * xr * (1.0 - tr * tr) * dinner, out=dx[r])
    for_row_blocks(rows, x)
    return dx.reshape(shape)


# ---- causal multi-head self-attention ---------------------------------------------------------

def softmax_inplace(x):
    """Overwrites x in place with its row softmax over the last axis, and returns it.

    x (..., K); rows that are all -inf are not expected. Twin: reference.softmax_forward."""
    if np.ndim(x) < 1:
        raise _shape_error("x", "(..., K)", x)
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def attention_forward(qkv, n_heads, att_mask=None):
    """qkv (..., T, 3C) -> y (..., T, C): softmax(q k^T / sqrt(hs) + causal) [dropout] @ v, per head.

    att_mask is None or a scaled dropout mask of shape (..., NH, T, T) for the attention weights.
    The leading axes are flattened into one batch axis B (the book's (B, T, 3C) stays as it is).
    Twin: reference.attention_forward.
    """
    if np.ndim(qkv) < 2 or qkv.shape[-1] % (3 * n_heads):
        raise _shape_error("qkv", f"(..., T, 3C) with C a multiple of n_heads={n_heads}", qkv)
    *lead, T, C3 = qkv.shape
    if att_mask is not None and np.shape(att_mask) != (*lead, n_heads, T, T):
        raise _shape_error("att_mask", f"(..., NH, T, T) = {(*lead, n_heads, T, T)}", att_mask)
    B, C = math.prod(lead), C3 // 3
    hs = C // n_heads
    q, k, v = qkv.reshape(B, T, 3, n_heads, hs).transpose(2, 0, 3, 1, 4)    # 3 x (B, NH, T, hs)
    mask = None if att_mask is None else att_mask.reshape(B, n_heads, T, T)
    att = np.empty((B, n_heads, T, T), qkv.dtype)
    y = np.empty((B, T, n_heads, hs), qkv.dtype)                            # heads side by side
    bias = causal_bias(T, qkv.dtype)

    def head(i):                                                            # one head: b, h
        b, h = divmod(i, n_heads)
        a = np.matmul(q[b, h], k[b, h].T, out=att[b, h])                    # (T, T)
        a *= 1.0 / math.sqrt(hs)
        a += bias
        softmax_inplace(a)
        a_d = a if mask is None else a * mask[b, h]                         # dropout
        np.matmul(a_d, v[b, h], out=y[b, :, h])                             # (T, hs)
    parallel_map(head, range(B * n_heads))
    q, k, v = (a.reshape(*lead, n_heads, T, hs) for a in (q, k, v))       # the twin's cache
    return y.reshape(*lead, T, C), (q, k, v, att.reshape(*lead, n_heads, T, T), att_mask)


def attention_backward(dy, cache):
    """dy (..., T, C) -> dqkv (..., T, 3C). Twin: reference.attention_backward."""
    q, k, v, att, att_mask = cache
    *lead, NH, T, hs = q.shape
    if np.shape(dy) != (*lead, T, NH * hs):
        raise _shape_error("dy", f"(..., T, C) = {(*lead, T, NH * hs)}", dy)
    B = math.prod(lead)                                                     # views, as in the forward
    q, k, v = (a.reshape(B, NH, T, hs) for a in (q, k, v))
    att = att.reshape(B, NH, T, T)
    mask = None if att_mask is None else att_mask.reshape(B, NH, T, T)
    dy = dy.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)                     # (B, NH, T, hs)
    dqkv = np.empty((B, T, 3, NH, hs), dtype=dy.dtype)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)                              # 3 x (B, NH, T, hs)

    def head(i):
        b, h = divmod(i, NH)
        a = att[b, h]
        a_d = a if mask is None else a * mask[b, h]
        np.matmul(a_d.T, dy[b, h], out=dv[b, h])                            # y = att_d @ v
        datt = dy[b, h] @ v[b, h].T                                         # (T, T)
        if mask is not None:
            datt *= mask[b, h]
        # softmax: datt_pre = att * (datt - sum_j(att_j * datt_j)); masked entries have att = 0
        datt -= np.sum(a * datt, axis=-1, keepdims=True)
        datt *= a
        datt *= 1.0 / math.sqrt(hs)                                         # att_pre = q k^T / sqrt(hs)
        np.matmul(datt, k[b, h], out=dq[b, h])
        np.matmul(datt.T, q[b, h], out=dk[b, h])
    parallel_map(head, range(B * NH))
    return dqkv.reshape(*lead, T, 3 * NH * hs)


# ---- softmax cross-entropy -------------------------------------------------------------------

def cross_entropy_forward(logits, targets):
    """Overwrites logits in place with softmax(logits), the cache: pass a copy to keep yours.

    logits (..., V), targets (...) int -> (mean over positions of -log softmax(logits)[target],
    cache). In place because the (N, V) logits, over GPT-2's 50,257 tokens, are the largest
    activation, and the model's own: no copy is made. Twin: reference.cross_entropy_forward.
    """
    loss = _softmax_cross_entropy(logits, targets, keep_probs=True)
    return loss, (logits, targets)                    # logits now hold the probabilities


def cross_entropy_loss(logits, targets):
    """Overwrites logits in place with exp(logits - max): pass a copy to keep yours. -> the loss.

    cross_entropy_forward's loss without its cache, for evaluation: logits (..., V), targets (...).
    Twin: reference.cross_entropy_forward (its loss)."""
    return _softmax_cross_entropy(logits, targets, keep_probs=False)


def _softmax_cross_entropy(logits, targets, keep_probs):
    """Mean cross-entropy; overwrites logits with exp(logits - max), normalised when keep_probs."""
    if np.ndim(logits) >= 1 and np.shape(targets) != logits.shape[:-1]:
        raise _shape_error("targets", f"logits' leading shape {logits.shape[:-1]}", targets)
    logits = _rows_in_place(logits, "logits", "(..., V)")              # (N, V)
    targets = np.reshape(targets, -1)                                  # (N,): a view
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
    """Overwrites the cached probabilities in place with dlogits (..., V) = (softmax - onehot) / N,
    and returns them. N is the number of positions. Twin: reference.cross_entropy_backward."""
    probs_in, targets = cache
    if np.ndim(probs_in) >= 1 and np.shape(targets) != probs_in.shape[:-1]:
        raise _shape_error("targets", f"the probabilities' leading shape {probs_in.shape[:-1]}", targets)
    probs = _rows_in_place(probs_in, "probs", "(..., V)")              # (N, V)
    targets = np.reshape(targets, -1)
    N = probs.shape[0]

    def rows(r):
        p = probs[r]
        p[np.arange(len(p)), targets[r]] -= 1.0
        p *= 1.0 / N
    for_row_blocks(rows, probs)
    return probs_in
