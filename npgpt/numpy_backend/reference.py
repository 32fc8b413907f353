"""GPT-2's layers in plain NumPy, each backward derived: the textbook form of the NumPy backend.

Read this file first. Every layer is a pair,
    <op>_forward(inputs...)  -> (out, cache)       the cache holds what the backward needs
    <op>_backward(dout, cache) -> gradients         of the inputs, then of the parameters
written on whole arrays, one idea per line: no threads, no blocks, no `out=`, nothing done in
place, no argument modified. Each backward's docstring derives it, from the forward's equation to
the code. layers.py is the same math made fast (blocks of rows that stay in the cache, every core
busy, gradients written straight into the model's buffer); tests/test_numpy_kernels.py proves
each fast function equal to its twin here. gpt2.py, read next, is GPT-2's whole forward and
backward written with this file's functions; build_model(cfg, kernels="reference") trains on it
(with reference_optim.py's AdamW and clipping), so that `npgpt gradcheck --kernels reference`
checks an edit to this file.

Shapes: B batch, T time (tokens), C channels (emb_dim), NH heads, hs head size (C // NH),
V vocabulary; `...` is any number of leading axes (the book's (B, T, C), or N = B * T rows).
Weights are in PyTorch's (out, in) layout: a linear layer is x @ w.T + b.

Notation. A gradient is always of the loss L: d<name> means dL/d(name), an array of name's shape
(dx is dL/dx, dout is dL/dout). A derivative of one tensor with respect to another, a *local*
derivative, is written with the partial sign and both names: ∂y_i/∂x_j, never dy. delta_ij
is 1 when i == j and 0 otherwise (the entries of an identity matrix); [cond] is 1 when cond holds
and 0 otherwise; sum_i and mean_i run over the index named, a row's C (or K, V) entries.

The chain rule, in the form every backward uses: if y = f(x) and the loss L depends on x only
through y, then dL/dx_j = sum_i dL/dy_i * ∂y_i/∂x_j. A backward gets dout = dL/dout and returns
dL/d(input), then dL/d(each parameter). It all starts at the loss, where dL/dL = 1: that is why
cross_entropy_backward, the first backward to run, takes no dout.

Where torch's optimizer.zero_grad() went: autograd adds every new gradient into .grad, so the book
clears it before each backward. Here a backward returns new arrays and the model stores them, so
nothing is left over from the last step to clear.
"""
from __future__ import annotations

import math

import numpy as np

LN_EPS = 1e-5                       # LayerNorm's epsilon, as GPT-2's and torch's
GELU_K = math.sqrt(2.0 / math.pi)   # the tanh form of GELU, as GPT-2 uses


# ---- token + position embeddings -------------------------------------------------------------

def embedding_forward(idx, wte, wpe):
    """idx (..., T) int, wte (V, C), wpe (context_length, C) -> x (..., T, C) = wte[idx] + wpe[:T]"""
    T = idx.shape[-1]
    x = wte[idx] + wpe[:T]                            # (..., T, C): a row of wte per token, plus its position's row
    return x, (idx, wte.shape, wpe.shape)


def embedding_backward(dx, cache):
    """dx (..., T, C) -> dwte (V, C), dwpe (context_length, C)

    x[b, t] = wte[idx[b, t]] + wpe[t]: a lookup is a sum with one term, so each row of dx goes to
    the one row of wte it came from, and to its position's row of wpe:
        dwte[v] = sum of dx[b, t] over every (b, t) with idx[b, t] == v
        dwpe[t] = sum of dx[b, t] over b;   rows of wpe past T were not used: 0
    A token that appears twice must add both rows. `dwte[idx] += dx` does not: NumPy evaluates it as
    dwte[idx] = dwte[idx] + dx, reading every row once and writing it once per occurrence, so a
    repeated id keeps only its last row. np.add.at adds one occurrence at a time.
    """
    idx, wte_shape, wpe_shape = cache
    T, C = dx.shape[-2], dx.shape[-1]
    dwte = np.zeros(wte_shape, dx.dtype)
    np.add.at(dwte, idx.reshape(-1), dx.reshape(-1, C))
    dwpe = np.zeros(wpe_shape, dx.dtype)
    dwpe[:T] = dx.reshape(-1, T, C).sum(axis=0)       # (T, C): summed over the batch
    return dwte, dwpe


# ---- dropout ---------------------------------------------------------------------------------

def dropout_mask(rng, shape, p, dtype=np.float32):
    """The scaled keep-mask of inverted dropout: 1 / (1 - p) with probability 1 - p, else 0.

    Scaling the kept values by 1 / (1 - p) keeps each value's expectation, so evaluation (no
    dropout) needs no rescaling. The draws are rng.random(shape, dtype=np.float32)'s.
    """
    keep = rng.random(shape, dtype=np.float32) >= p   # True with probability 1 - p
    dtype = np.dtype(dtype)
    return keep.astype(dtype) * dtype.type(1.0 / (1.0 - p))


def dropout_forward(x, mask):
    """x (...), mask (same shape) or None (dropout off) -> x * mask"""
    if mask is None:
        return x, None
    return x * mask, mask


def dropout_backward(dout, cache):
    """out = x * mask, entry by entry: ∂out/∂x = mask, so dx = dout * mask. A dropped entry (mask 0)
    passes no gradient, a kept one passes it scaled by 1 / (1 - p), as the forward scaled the value."""
    mask = cache
    if mask is None:
        return dout
    return dout * mask


# ---- linear ----------------------------------------------------------------------------------

def linear_forward(x, w, b=None):
    """x (..., Cin), w (Cout, Cin), b (Cout,) or None -> y (..., Cout) = x @ w.T + b"""
    y = x @ w.T
    if b is not None:
        y = y + b
    return y, (x, w, b is not None)


def linear_backward(dy, cache):
    """dy (..., Cout) -> dx (..., Cin), dw (Cout, Cin), db (Cout,) or None

    With the rows of x and y numbered n (all leading axes flattened):
        y[n, o] = sum_i x[n, i] * w[o, i] + b[o]
    so ∂y[n, o]/∂x[n, i] = w[o, i], ∂y[n, o]/∂w[o, i] = x[n, i], ∂y[n, o]/∂b[o] = 1, and
        dx[n, i] = sum_o dy[n, o] * w[o, i]    dx = dy @ w           (a product with w, not w.T)
        dw[o, i] = sum_n dy[n, o] * x[n, i]    dw = dy.T @ x         (every row used the same w)
        db[o]    = sum_n dy[n, o]              db = dy summed over rows
    The shapes tell which matrix to transpose: dw must be (Cout, Cin), and only dy.T @ x is.
    """
    x, w, has_bias = cache
    x_rows = x.reshape(-1, x.shape[-1])               # (N, Cin)
    dy_rows = dy.reshape(-1, dy.shape[-1])            # (N, Cout)
    dx = dy @ w                                       # (..., Cin)
    dw = dy_rows.T @ x_rows                           # (Cout, Cin)
    db = dy_rows.sum(axis=0) if has_bias else None    # (Cout,)
    return dx, dw, db


# ---- LayerNorm -------------------------------------------------------------------------------

def layernorm_forward(x, w, b=None):
    """x (..., C), w (C,), b (C,) or None -> y (..., C) = (x - mean) / sqrt(var + eps) * w + b, over C"""
    mean = x.mean(axis=-1, keepdims=True)             # (..., 1)
    xc = x - mean                                     # centred
    var = (xc * xc).mean(axis=-1, keepdims=True)      # (..., 1), the biased variance (divides by C)
    rstd = 1.0 / np.sqrt(var + LN_EPS)                # (..., 1), the reciprocal standard deviation
    xhat = xc * rstd                                  # (..., C): mean 0, variance 1 per row
    y = xhat * w
    if b is not None:
        y = y + b
    return y, (xhat, rstd, w, b is not None)


def layernorm_backward(dy, cache):
    """dy (..., C) -> dx (..., C), dw (C,), db (C,)

    The scale and shift, y = xhat * w + b, entry by entry:
        dxhat = dy * w,   dw = sum over rows of dy * xhat,   db = sum over rows of dy
    The normalisation, one row of C entries: xhat_i = (x_i - mean) * rstd, where
        mean = (1/C) sum_k x_k,   var = (1/C) sum_k (x_k - mean)^2,   rstd = (var + eps)^(-1/2).
    Every x_j moves the mean and the variance, so every xhat_i depends on every x_j:
        ∂mean/∂x_j = 1/C
        ∂var/∂x_j  = (2/C) sum_k (x_k - mean) (delta_kj - 1/C) = (2/C) (x_j - mean)
                     (the sum of (x_k - mean) over k is 0)
        ∂rstd/∂x_j = -(1/2) (var + eps)^(-3/2) * ∂var/∂x_j
                   = -(1/2) rstd^3 * (2/C) (x_j - mean)        ((var + eps)^(-3/2) = rstd^3)
                   = -rstd^2 xhat_j / C                        (rstd (x_j - mean) = xhat_j)
        ∂xhat_i/∂x_j = rstd (delta_ij - 1/C) + (x_i - mean) * ∂rstd/∂x_j
                     = rstd (delta_ij - 1/C - xhat_i xhat_j / C)
    Then dx_j = sum_i dxhat_i * ∂xhat_i/∂x_j, and each of the three terms in the bracket gives
    one sum over i:
        sum_i dxhat_i rstd delta_ij         = rstd dxhat_j                     (only i = j is left)
        sum_i dxhat_i rstd (1/C)            = rstd mean_i(dxhat_i)
        sum_i dxhat_i rstd xhat_i xhat_j / C = rstd xhat_j mean_i(dxhat_i * xhat_i)
    so
        dx_j = rstd * (dxhat_j  -  mean_i(dxhat_i)  -  xhat_j * mean_i(dxhat_i * xhat_i))
    the direct path, the path through the mean, and the path through the variance. (llm.c's
    doc/layernorm states this result and checks it against torch; it does not derive it.)
    """
    xhat, rstd, w, has_bias = cache
    C = dy.shape[-1]
    dxhat = dy * w
    mean_term = dxhat.mean(axis=-1, keepdims=True)                  # (..., 1): through the mean
    var_term = xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)   # (..., C): through the variance
    dx = (dxhat - mean_term - var_term) * rstd
    dw = (dy * xhat).reshape(-1, C).sum(axis=0)                     # (C,)
    db = dy.reshape(-1, C).sum(axis=0) if has_bias else None       # (C,)
    return dx, dw, db


# ---- GELU, tanh form -------------------------------------------------------------------------

def gelu_forward(x):
    """x (...) -> 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), entry by entry"""
    t = np.tanh(GELU_K * (x + 0.044715 * x * x * x))
    y = 0.5 * x * (1.0 + t)
    return y, (x, t)


def gelu_backward(dy, cache):
    """dy (...) -> dx (...)

    y = 0.5 x (1 + t) with t = tanh(u), u = k (x + 0.044715 x^3), k = sqrt(2/pi). By the product rule,
        ∂y/∂x = 0.5 (1 + t) + 0.5 x ∂t/∂x
    and with tanh'(u) = 1 - tanh(u)^2 and ∂u/∂x = k (1 + 3 * 0.044715 x^2),
        ∂t/∂x = (1 - t^2) * k (1 + 3 * 0.044715 x^2),
    entry by entry, so dx = dy * ∂y/∂x.
    The forward kept t, so no tanh is recomputed.
    """
    x, t = cache
    du_dx = GELU_K * (1.0 + 3 * 0.044715 * x * x)
    dy_dx = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx     # the local derivative ∂y/∂x
    return dy * dy_dx


# ---- softmax ---------------------------------------------------------------------------------

def softmax_forward(z):
    """z (..., K) -> p (..., K) = exp(z) / sum(exp(z)) over the last axis.

    exp(z - max) / sum(exp(z - max)) is the same number (the exp(-max) cancels) and never
    overflows. An entry of -inf gets probability 0 (how the causal mask hides the future).
    """
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    return p, p


def softmax_backward(dp, cache):
    """dp (..., K) -> dz (..., K) = p * (dp - sum(p * dp)) over the last axis

    p_i = exp(z_i) / S with S = sum_k exp(z_k). Its Jacobian, by the quotient rule:
        ∂p_i/∂z_j = (delta_ij exp(z_i) S - exp(z_i) exp(z_j)) / S^2 = p_i (delta_ij - p_j)
    a K x K matrix per row, diag(p) - p p^T. Applied to dp it collapses to a vector expression:
        dz_j = sum_i dp_i p_i (delta_ij - p_j) = p_j dp_j - p_j sum_i p_i dp_i
             = p_j (dp_j - sum_i p_i dp_i)
    so the backward costs O(K) a row, not O(K^2). Where p_j = 0 (a masked entry) dz_j = 0.
    """
    p = cache
    return p * (dp - (p * dp).sum(axis=-1, keepdims=True))


# ---- causal multi-head self-attention ---------------------------------------------------------

def causal_bias(T, dtype):
    """(T, T) additive mask: 0 where a query may look (key <= query), -inf above the diagonal."""
    return np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)


def attention_forward(qkv, n_heads, att_mask=None):
    """qkv (..., T, 3C) -> y (..., T, C): per head, softmax(q k^T / sqrt(hs) + causal) @ v

    qkv holds the queries, keys and values side by side (GPT-2's c_attn makes all three in one
    product). att_mask is None or a scaled dropout mask (..., NH, T, T) for the attention weights.
    """
    *lead, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_heads
    heads = qkv.reshape(*lead, T, 3, n_heads, hs)                   # (..., T, 3, NH, hs)
    q, k, v = np.moveaxis(heads, (-3, -2), (0, -3))                 # 3 x (..., NH, T, hs)
    scores = (q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(hs))       # (..., NH, T, T)
    scores = scores + causal_bias(T, qkv.dtype)                     # the future: -inf
    att, _ = softmax_forward(scores)                                # each row sums to 1
    att_d, _ = dropout_forward(att, att_mask)
    y = att_d @ v                                                   # (..., NH, T, hs)
    y = np.moveaxis(y, -3, -2).reshape(*lead, T, C)                 # heads side by side again
    return y, (q, k, v, att, att_mask)


def attention_backward(dy, cache):
    """dy (..., T, C) -> dqkv (..., T, 3C)

    The forward, backwards, one line at a time (per head; @ is a matrix product, as in linear):
        y = heads side by side     dy to (..., NH, T, hs): the reshape and moveaxis, undone
        y = att_d @ v              dv = att_d^T @ dy,   datt_d = dy @ v^T
        att_d = att * mask         datt = datt_d * mask                        (dropout)
        att = softmax(scores)      dscores = att * (datt - sum(att * datt))    (softmax_backward)
        scores = (q k^T) * scale   dqk = dscores * scale   (the product's gradient, before the scale)
        qk = q k^T                 dq = dqk @ k,   dk = dqk^T @ q
        q, k, v = heads(qkv)       dqkv: dq, dk, dv moved back to (..., T, NH, hs), side by side
    with scale = 1 / sqrt(hs). The code keeps one name for the last three lines' gradient: its
    `dscores` is dqk, the softmax's gradient already multiplied by the scale, so both products use
    it as it is. The causal bias is a constant: no gradient of its own, and since the masked
    weights are 0, softmax_backward gives their scores no gradient either. The split of qkv into
    q, k and v and the split into heads are a reshape and a moveaxis: they move numbers and change
    none, so their backward moves the gradients back (np.stack, then the inverse moveaxis).
    """
    q, k, v, att, att_mask = cache
    *lead, NH, T, hs = q.shape
    dy = np.moveaxis(dy.reshape(*lead, T, NH, hs), -2, -3)          # (..., NH, T, hs)
    att_d, _ = dropout_forward(att, att_mask)
    dv = att_d.swapaxes(-1, -2) @ dy                                # (..., NH, T, hs)
    datt_d = dy @ v.swapaxes(-1, -2)                                # (..., NH, T, T)
    datt = dropout_backward(datt_d, att_mask)
    dscores = softmax_backward(datt, att) * (1.0 / math.sqrt(hs))  # dqk above: the scale folded in
    dq = dscores @ k                                                # (..., NH, T, hs)
    dk = dscores.swapaxes(-1, -2) @ q
    dheads = np.moveaxis(np.stack([dq, dk, dv]), (0, -3), (-3, -2))  # (..., T, 3, NH, hs)
    return dheads.reshape(*lead, T, 3 * NH * hs)


# ---- the residual connection -----------------------------------------------------------------

def residual_forward(x, fx):
    """x (..., C), fx = f(x) (..., C) -> x + fx: a block adds its output to its input"""
    return x + fx, None


def residual_backward(dout, cache):
    """dout (..., C) -> (dx, dfx), both dout: out = x + fx, so ∂out/∂x = 1 and ∂out/∂fx = 1.

    x is also f's input, so x receives a second gradient, the one that flows back through f, and
    the two add: dx_total = dout + (what f's backward gives for dfx). gpt2.py's block_backward
    writes exactly that: `dx, dm = residual_backward(dx, None)`, then dm back through the MLP to
    its input, then `dx = dx + dm`. The gradient passes every block unchanged, plus each block's
    contribution, which is why deep residual networks train."""
    return dout, dout


# ---- softmax cross-entropy -------------------------------------------------------------------

def cross_entropy_forward(logits, targets):
    """logits (..., V), targets (...) int -> the mean over all positions of -log softmax(logits)[target]

    -log(exp(z_target) / sum_k exp(z_k)) = log(sum_k exp(z_k)) - z_target, with z = logits - max
    (the same number, and no overflow). exp(loss) is the perplexity.
    """
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=-1)                                          # (...)
    z_target = np.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    losses = np.log(total) - z_target                               # (...): one loss per position
    loss = float(np.mean(losses, dtype=np.float64))                 # averaged in float64
    probs = e / total[..., None]                                    # softmax(logits), for the backward
    return loss, (probs, targets)


def cross_entropy_backward(cache):
    """-> dlogits (..., V) = (softmax(logits) - onehot(target)) / N, N the number of positions

    No dout: the loss is the end of the forward, and the gradient that arrives at it is dL/dL = 1.
    One position's loss is l = log(sum_k exp(z_k)) - z_t, t its target. Then
        ∂l/∂z_j = exp(z_j) / sum_k exp(z_k) - [j == t] = p_j - onehot_j
    The mean over N positions gives each position's gradient the factor 1 / N. (The softmax's
    Jacobian and the log's derivative cancel into this simple form: one reason softmax and
    cross-entropy are computed together.)
    """
    probs, targets = cache
    N = targets.size
    onehot = np.zeros_like(probs)
    np.put_along_axis(onehot, targets[..., None], 1.0, axis=-1)
    return (probs - onehot) * (1.0 / N)
