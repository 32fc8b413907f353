"""GPT-2's layers in NumPy, fast: read reference.py first.

reference.py is the textbook form of every layer, one idea per line and every backward derived;
this file is the same math made fast, function by function under the same names (each docstring
names its twin), and tests/test_numpy_kernels.py proves each equal to its twin. It holds the
per-row layers (embedding, dropout, linear, LayerNorm, GELU); the two built on a row softmax,
attention and cross-entropy, are in softmax_layers.py and imported at the end of this file, so
that `layers` names every fast kernel the model calls.

Shapes: B batch, T time (tokens), C channels (emb_dim), NH heads, hs head size (C // NH),
V vocabulary, N = B * T rows; `...` is any number of leading axes. Every function takes the shapes
its twin takes: the per-row layers (linear, LayerNorm, GELU, dropout, cross-entropy) any
(..., C), embedding (..., T) ids and attention (..., T, 3C). Each works on a reshape of its
input to the (N, C) rows (rows.py), and returns the caller's leading shape. A shape that does
not fit raises ValueError naming the argument and the shape expected. Weights are in
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


import numpy as np

from .reference import GELU_K, LN_EPS     # one copy of the constants
from .rows import as_entries, as_rows, shape_error
from .threads import for_row_blocks, matmul, uniform_float32


# ---- embeddings: token + position ------------------------------------------------------------

def embedding_forward(idx, wte, wpe):
    """idx (..., T) int -> x (..., T, C) = wte[idx] + wpe[:T]. Twin: reference.embedding_forward."""
    if np.ndim(idx) < 1 or idx.shape[-1] > len(wpe):
        raise shape_error("idx", f"(..., T) with T <= {len(wpe)} (the rows of wpe)", idx)
    T = idx.shape[-1]
    out = wte[idx]                                    # (..., T, C)
    out += wpe[:T]
    return out, idx


def embedding_backward(dout, cache, dwte, dwpe):
    """Adds into dwte and writes dwpe in place (a row of dwte per token id, summed over repeats).

    dout (..., T, C), dwte (V, C), dwpe (context_length, C). Twin: reference.embedding_backward."""
    idx = cache
    if np.ndim(dwte) != 2:
        raise shape_error("dwte", "(V, C)", dwte)
    C, T = dwte.shape[1], idx.shape[-1]
    if np.shape(dout) != (*idx.shape, C):
        raise shape_error("dout", f"the ids' shape + (C,) = {(*idx.shape, C)}", dout)
    if np.ndim(dwpe) != 2 or dwpe.shape[0] < T or dwpe.shape[1] != C:
        raise shape_error("dwpe", f"(context_length, {C}) with context_length >= {T}", dwpe)
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
        raise shape_error("mask", f"x's {np.shape(x)}", mask)
    if mask is None:
        return x, None
    return x * mask, mask


def dropout_backward(dout, cache):
    """dout (...) -> dx (...) = dout * mask. Twin: reference.dropout_backward."""
    mask = cache
    if mask is not None and np.shape(dout) != np.shape(mask):
        raise shape_error("dout", f"the mask's {np.shape(mask)}", dout)
    return dout if mask is None else dout * mask


# ---- linear ----------------------------------------------------------------------------------

def linear_forward(x, w, b=None):
    """x (..., Cin), w (Cout, Cin), b (Cout,) or None -> (..., Cout). Twin: reference.linear_forward."""
    if np.ndim(w) != 2:
        raise shape_error("w", "(Cout, Cin)", w)
    Cout, Cin = w.shape
    if np.ndim(x) < 1 or x.shape[-1] != Cin:
        raise shape_error("x", f"(..., {Cin})", x)
    if b is not None and np.shape(b) != (Cout,):
        raise shape_error("b", f"({Cout},)", b)
    x_rows = as_rows(x, "x")                            # (N, Cin)
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
        raise shape_error("dout", f"(..., {Cout}) with {x.size // Cin} rows", dout)
    if np.shape(dw) != (Cout, Cin):
        raise shape_error("dw", f"({Cout}, {Cin})", dw)
    if db is not None and np.shape(db) != (Cout,):
        raise shape_error("db", f"({Cout},)", db)
    dout_rows, x = as_rows(dout, "dout"), x.reshape(-1, Cin)           # (N, Cout), (N, Cin)
    matmul(dout_rows.T, x, out=dw)                    # (Cout, N) @ (N, Cin)
    if db is not None:                                # summed per block of rows, then over blocks
        np.sum(for_row_blocks(lambda r: np.sum(dout_rows[r], axis=0), dout_rows), axis=0, out=db)
    return matmul(dout_rows, w).reshape(*dout.shape[:-1], Cin)       # (N, Cout) @ (Cout, Cin)


# ---- LayerNorm -------------------------------------------------------------------------------

def layernorm_forward(x, w, b=None):
    """x (..., C), w (C,), b (C,) or None -> (x - mean) / sqrt(var + eps) * w + b, statistics over C.

    Twin: reference.layernorm_forward."""
    x_in = x
    x = as_rows(x, "x")                                                 # (N, C)
    C = x.shape[1]
    if np.shape(w) != (C,):
        raise shape_error("w", f"({C},)", w)
    if b is not None and np.shape(b) != (C,):
        raise shape_error("b", f"({C},)", b)
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
        raise shape_error("dout", f"(..., {C}) with {xhat.size // C} rows", dout)
    if np.shape(dw) != (C,):
        raise shape_error("dw", f"({C},)", dw)
    if has_bias != (db is not None) or (has_bias and np.shape(db) != (C,)):
        raise shape_error("db", f"({C},)", db)
    dout_in = dout
    dout, xhat, rstd = as_rows(dout, "dout"), xhat.reshape(-1, C), rstd.reshape(-1, 1)
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
    x = as_entries(x)                                                   # (N, 4C)
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
        raise shape_error("dout", f"x's {np.shape(x)}", dout)
    shape = dout.shape
    dout, x, t = as_entries(dout), as_entries(x), as_entries(t)
    dx = np.empty_like(dout)

    def rows(r):
        xr, tr = x[r], t[r]
        # d/dx: 0.5 * (1 + t) + 0.5 * x * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 * x^2)
        dinner = GELU_K * (1.0 + 3 * 0.044715 * xr * xr)
        np.multiply(dout[r], 0.5 * (1.0 + tr) + 0.5 * xr * (1.0 - tr * tr) * dinner, out=dx[r])
    for_row_blocks(rows, x)
    return dx.reshape(shape)


# ---- attention and cross-entropy, in softmax_layers.py -----------------------------------------

from .softmax_layers import (attention_backward, attention_forward, causal_bias,  # noqa: E402,F401
                             cross_entropy_backward, cross_entropy_forward, cross_entropy_loss,
                             softmax_inplace)
