"""GPT-2's fast layers that take a softmax over a row: attention (over the keys) and cross-entropy
(over the vocabulary). The rest of the fast layers, and what this file shares with them, are in
layers.py, which also names these functions: read layers.py first, and reference.py before it.

Shapes: B batch, T time (tokens), C channels, NH heads, hs head size (C // NH), V vocabulary,
N = B * T rows; `...` is any number of leading axes. Each function takes its reference.py twin's
shapes (rows.py) and names its twin. softmax_inplace overwrites its x and cross-entropy its logits
in place (the first line of each docstring says so): at GPT-2's 50,257 tokens the (N, V) logits
are the largest activation, and the model's own, so it keeps no copy of them.

Attention runs `def head(i): ...` for each (batch, head) pair on every core (threads.parallel_map);
cross-entropy runs `def rows(r): ...` on blocks of rows that stay in the L2 cache.
"""
from __future__ import annotations

import math

import numpy as np

from .reference import causal_bias
from .rows import as_rows_in_place, shape_error
from .threads import for_row_blocks, parallel_map


# ---- causal multi-head self-attention ---------------------------------------------------------

def softmax_inplace(x):
    """Overwrites x in place with its row softmax over the last axis, and returns it.

    x (..., K); rows that are all -inf are not expected. Twin: reference.softmax_forward."""
    if np.ndim(x) < 1:
        raise shape_error("x", "(..., K)", x)
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
        raise shape_error("qkv", f"(..., T, 3C) with C a multiple of n_heads={n_heads}", qkv)
    *lead, T, C3 = qkv.shape
    if att_mask is not None and np.shape(att_mask) != (*lead, n_heads, T, T):
        raise shape_error("att_mask", f"(..., NH, T, T) = {(*lead, n_heads, T, T)}", att_mask)
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
        raise shape_error("dy", f"(..., T, C) = {(*lead, T, NH * hs)}", dy)
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
        raise shape_error("targets", f"logits' leading shape {logits.shape[:-1]}", targets)
    logits = as_rows_in_place(logits, "logits", "(..., V)")              # (N, V)
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
        raise shape_error("targets", f"the probabilities' leading shape {probs_in.shape[:-1]}", targets)
    probs = as_rows_in_place(probs_in, "probs", "(..., V)")              # (N, V)
    targets = np.reshape(targets, -1)
    N = probs.shape[0]

    def rows(r):
        p = probs[r]
        p[np.arange(len(p)), targets[r]] -= 1.0
        p *= 1.0 / N
    for_row_blocks(rows, probs)
    return probs_in
