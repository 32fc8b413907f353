"""Decoding, written once for both backends: temperature, top-k and top-p turn the last position's
logits into next-token probabilities, and generate() runs the one sampling loop with a KV cache.
sampled_token_counts tallies many draws from one distribution (the book's print_sampled_tokens).

Each backend supplies three things to the loop (see Backend in base.py): next_logits(ids, cache),
the forward step that returns the last position's logits; new_kv_cache(batch_size, capacity), a
KVCache in its own arrays; and sampler(seed), which picks the next ids from logits. The NumPy
rules in next_token_probs are the reference; the torch backend implements the same rules in torch
(torch_backend/sampling.py) and the parity suite checks that they agree.
"""
from __future__ import annotations

import math

import numpy as np

from .config import check_token_ids


class KVCache:
    """Keys and values of every layer for the first `length` positions, preallocated for `capacity`
    positions: k[i], v[i] are (B, NH, capacity, hs) arrays made by zeros(shape), NumPy's or torch's.

    The contract both backends' attention follows: update(layer, k, v) stores the new positions'
    keys and values and returns all of them so far; the model advances length once every layer
    has stored its share."""

    def __init__(self, cfg, batch_size: int, capacity: int, zeros):
        shape = (batch_size, cfg.n_heads, capacity, cfg.head_dim)
        self.k = [zeros(shape) for _ in range(cfg.n_layers)]
        self.v = [zeros(shape) for _ in range(cfg.n_layers)]
        self.length = 0

    def update(self, layer: int, k, v):
        """k, v (B, NH, Tn, hs) at positions length.. -> all keys, values so far (B, NH, t1, hs)."""
        t0, t1 = self.length, self.length + k.shape[2]
        self.k[layer][:, :, t0:t1] = k
        self.v[layer][:, :, t0:t1] = v
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]


def check_sampling_args(vocab_size, temperature=1.0, top_k=None, top_p=None):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or not 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k must be an integer in [1, {vocab_size}] or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None) -> np.ndarray:
    """logits (..., V) -> probabilities (..., V), in float64.

    temperature 0: all mass on the argmax (the first one on ties), as greedy decoding picks.
    top_k: logits below the k-th largest become -inf (ties with the k-th value are kept, as the
           book's torch.where(logits < min_val, -inf, logits) does).
    temperature T > 0: softmax(logits / T).
    top_p: keep the smallest set of most likely tokens whose probability sums to at least p
           (sorted by probability, ties broken by lower token id), then renormalise.
    """
    logits = np.asarray(logits, dtype=np.float64)
    V = logits.shape[-1]
    check_sampling_args(V, temperature, top_k, top_p)
    check_logits(np.isnan(logits).any() or np.isposinf(logits).any(), np.isfinite(logits).any(axis=-1).all())
    if temperature == 0:
        probs = np.zeros_like(logits)
        np.put_along_axis(probs, logits.argmax(axis=-1)[..., None], 1.0, axis=-1)
        return probs
    if top_k is not None:
        kth = np.sort(logits, axis=-1)[..., V - top_k][..., None]
        logits = np.where(logits < kth, -np.inf, logits)
    z = (logits - logits.max(axis=-1, keepdims=True)) / temperature    # <= 0: no overflow for tiny T
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        before = np.cumsum(sorted_probs, axis=-1) - sorted_probs     # mass of the more likely tokens
        keep_sorted = before < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def check_logits(has_nan_or_posinf: bool, every_row_finite: bool) -> None:
    """The one error both backends give for logits no distribution can come from (NaN weights, say)."""
    if has_nan_or_posinf:
        raise ValueError("the model's logits contain NaN or +inf (are its weights finite?); cannot sample")
    if not every_row_finite:
        raise ValueError("every row of logits needs at least one finite value")


def sample(probs, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of probs (B, V) by inverting the cumulative distribution -> (B,)."""
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(probs.shape[0]) * cdf[:, -1]
    # first index whose cumulative mass exceeds u: zero-probability tokens are never picked
    return (cdf <= u[:, None]).sum(axis=-1)


def sampled_token_counts(logits, temperature=1.0, top_k=None, top_p=None, n=1000, seed=123) -> np.ndarray:
    """logits (V,) -> how often each token comes out in n draws from next_token_probs: counts (V,),
    int64, summing to n. The draws are sample()'s on n copies of the row, from default_rng(seed)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 1:
        raise ValueError(f"logits: expected one row of shape (V,), got shape {logits.shape}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    probs = next_token_probs(logits, temperature, top_k, top_p)
    cdf = np.cumsum(probs)
    u = np.random.default_rng(seed).random(n) * cdf[-1]
    draws = np.searchsorted(cdf, u, side="right")       # sample()'s rule, without an (n, V) array
    return np.bincount(draws, minlength=len(probs))


def generate(model, idx, max_new_tokens=25, context_size=None, temperature=0.0, top_k=None,
             top_p=None, eos_id=None, seed=None, use_cache=True):
    """Extend idx (B, T) by up to max_new_tokens tokens -> (B, T + n), in the model's own backend.

    temperature=0 is greedy (the book's generate_text_simple); the context is cropped to the
    last context_size tokens (default: the model's context_length); generation stops once every
    row has produced eos_id (rows that finish early are padded with eos_id).
    """
    cfg = model.cfg
    idx = check_token_ids(idx, cfg.vocab_size, "idx")
    if idx.shape[1] == 0:
        raise ValueError("idx is empty: generation needs at least one prompt token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if context_size is None:
        context_size = cfg.context_length
    if isinstance(context_size, bool) or not isinstance(context_size, (int, np.integer)) \
            or not 1 <= context_size <= cfg.context_length:
        raise ValueError(f"context_size must be an integer in [1, {cfg.context_length}], got {context_size!r}")
    check_sampling_args(cfg.vocab_size, temperature, top_k, top_p)
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, (int, np.integer))
                               or not 0 <= eos_id < cfg.vocab_size):
        raise ValueError(f"eos_id must be a token id in [0, {cfg.vocab_size}) or None, got {eos_id!r}")
    return _decode(model, idx, int(max_new_tokens), int(context_size), float(temperature), top_k, top_p,
                   eos_id, seed, use_cache)


def _decode(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id, seed, use_cache):
    """The sampling loop. Dropout is off while generating; the training flag is restored after.

    The cache holds absolute positions, so it serves while the sequence fits in context_size;
    past that the window slides, every position shifts, and the window is recomputed.
    """
    was_training = model.training
    model.eval()
    pick = model.sampler(seed)
    out = idx                                                               # (B, T) int64, on the host
    finished = np.zeros(idx.shape[0], dtype=bool)
    cache = None
    try:
        for _ in range(max_new_tokens):
            if cache is not None and out.shape[1] <= context_size:
                logits = model.next_logits(out[:, -1:], cache)              # one new position
            else:
                window = out[:, -context_size:]
                fits = use_cache and window.shape[1] < context_size
                cache = model.new_kv_cache(out.shape[0], context_size) if fits else None
                logits = model.next_logits(window, cache)                   # (B, V)
            next_id = pick(logits, temperature, top_k, top_p)               # (B,) int64
            if eos_id is not None:
                next_id = np.where(finished, eos_id, next_id)
                finished |= next_id == eos_id
            out = np.concatenate([out, next_id[:, None]], axis=1)
            if eos_id is not None and finished.all():
                break
    finally:
        model.training = was_training
    return out
