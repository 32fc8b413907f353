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
    Twin: reference.attention_forward, whose cache keeps the (B, NH, T, T) weights; this one keeps
    each row's log-sum-exp instead, (B, NH, T), and the backward recomputes the weights from it
    (memory-efficient attention: at T=1024 the weights are 100 MB a layer). A head's queries run
    in blocks of ATT_BLOCK rows, each against the keys up to its last query only (causal: the rest
    of its row is 0), so a block's weights stay in the L2 cache and half of the T x T work is
    skipped. The rows' sums then run over fewer zeros in another order: equal to the twin within
    float rounding (tests/test_numpy_kernels.py states the bound).
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
    lse = np.empty((B, n_heads, T), qkv.dtype)                              # log-sum-exp per row
    y = np.empty((B, T, n_heads, hs), qkv.dtype)                            # heads side by side
    scale = 1.0 / math.sqrt(hs)

    def heads(group):                                                       # heads h of batch row b
        b, h = group
        for s, e in query_blocks(T):
            a = weights(q[b, h, s:e], k[b, h, :e], s, scale)                # (G, e - s, e) pre-softmax
            top = a.max(axis=-1, keepdims=True)
            a -= top
            np.exp(a, out=a)
            total = a.sum(axis=-1, keepdims=True)
            a /= total
            lse[b, h, s:e] = (top + np.log(total))[..., 0]
            if mask is not None:
                a *= mask[b, h, s:e, :e]                                    # dropout
            np.matmul(a, v[b, h, :e], out=y[b, s:e, h].swapaxes(0, 1))      # (G, e - s, hs)
    parallel_map(heads, head_groups(B, n_heads, T))
    q, k, v = (a.reshape(*lead, n_heads, T, hs) for a in (q, k, v))
    return y.reshape(*lead, T, C), (q, k, v, lse.reshape(*lead, n_heads, T), att_mask)


ATT_BLOCK = 128       # query rows a block: a head's (128, T) weights are 512 KiB at T=1024, in L2
ATT_ENTRIES = 1 << 17  # at short T, heads go together until their blocks' weights hold this many
                       # numbers: fewer, larger NumPy calls (at T=64, a batch row's 12 heads at once)


def query_blocks(T):
    return [(s, min(s + ATT_BLOCK, T)) for s in range(0, T, ATT_BLOCK)]


def head_groups(B, NH, T):
    """(b, slice of heads) for every batch row: the work items, their number set by the shapes."""
    G = max(1, ATT_ENTRIES // (min(T, ATT_BLOCK) * T))
    return [(b, slice(h, min(h + G, NH))) for b in range(B) for h in range(0, NH, G)]


def weights(q, k, s, scale):
    """Queries s..e of G heads, q (G, e - s, hs), against keys 0..e, k (G, e, hs) -> (q k^T) *
    scale + causal bias: -inf where a key is after its query, in the last e - s columns only."""
    a = q @ k.swapaxes(-1, -2)                                              # (G, e - s, e)
    a *= scale
    a[..., s:] += causal_bias(a.shape[-2], a.dtype)
    return a


def attention_backward(dy, cache):
    """dy (..., T, C) -> dqkv (..., T, 3C). Twin: reference.attention_backward.

    Each query block's weights are recomputed from q, k and the forward's log-sum-exp:
    att = exp(q k^T * scale + causal - lse). A head's blocks run in order, adding into its dk, dv."""
    q, k, v, lse, att_mask = cache
    *lead, NH, T, hs = q.shape
    if np.shape(dy) != (*lead, T, NH * hs):
        raise shape_error("dy", f"(..., T, C) = {(*lead, T, NH * hs)}", dy)
    B = math.prod(lead)                                                     # views, as in the forward
    q, k, v = (a.reshape(B, NH, T, hs) for a in (q, k, v))
    lse = lse.reshape(B, NH, T, 1)
    mask = None if att_mask is None else att_mask.reshape(B, NH, T, T)
    dy = dy.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)                     # (B, NH, T, hs)
    dqkv = np.empty((B, T, 3, NH, hs), dtype=dy.dtype)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)                              # 3 x (B, NH, T, hs)
    scale = 1.0 / math.sqrt(hs)

    def heads(group):
        b, h = group
        G = len(range(NH)[h])
        dk_h, dv_h = np.zeros((G, T, hs), dy.dtype), np.zeros((G, T, hs), dy.dtype)
        for s, e in query_blocks(T):
            a = weights(q[b, h, s:e], k[b, h, :e], s, scale)                # (G, e - s, e)
            a -= lse[b, h, s:e]
            np.exp(a, out=a)                                                # att, recomputed
            a_d = a if mask is None else a * mask[b, h, s:e, :e]
            dv_h[:, :e] += a_d.swapaxes(-1, -2) @ dy[b, h, s:e]             # y = att_d @ v
            datt = dy[b, h, s:e] @ v[b, h, :e].swapaxes(-1, -2)             # (G, e - s, e)
            if mask is not None:
                datt *= mask[b, h, s:e, :e]
            # softmax: datt_pre = att * (datt - sum_j(att_j * datt_j)); masked entries have att = 0
            datt -= np.sum(a * datt, axis=-1, keepdims=True)
            datt *= a
            datt *= scale                                                   # att_pre = q k^T / sqrt(hs)
            np.matmul(datt, k[b, h, :e], out=dq[b, h, s:e])
            dk_h[:, :e] += datt.swapaxes(-1, -2) @ q[b, h, s:e]
        dk[b, h], dv[b, h] = dk_h, dv_h
    parallel_map(heads, head_groups(B, NH, T))
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
