"""Text generation in NumPy with a KV cache.

Training recomputes keys and values for every position; generating token t+1 only needs the
new token's query against the keys and values of tokens 0..t, which the cache keeps. Each new
token then costs O(T) attention work and one pass over the weights, instead of a full forward.
Shapes: B batch, T tokens, C channels, NH heads, hs head size, S cache capacity.
"""
from __future__ import annotations

import math

import numpy as np

from .. import sampling
from . import layers as L


class KVCache:
    """Keys and values of every layer for the first `length` positions: (B, NH, S, hs) each."""

    def __init__(self, cfg, batch_size, capacity, dtype):
        shape = (cfg.n_layers, batch_size, cfg.n_heads, capacity, cfg.head_dim)
        self.k = np.zeros(shape, dtype)
        self.v = np.zeros(shape, dtype)
        self.length = 0


def forward_cached(model, idx, cache: KVCache) -> np.ndarray:
    """Run the new tokens idx (B, Tn) at positions cache.length.. -> logits of the last one (B, V)."""
    cfg, p = model.cfg, model.p
    B, Tn = idx.shape
    C, NH, hs = cfg.emb_dim, cfg.n_heads, cfg.head_dim
    t0, t1 = cache.length, cache.length + Tn
    x = p["wte"][idx] + p["wpe"][t0:t1]                                   # (B, Tn, C)
    x = x.reshape(B * Tn, C)
    # new query i (position t0 + i) may look at cached keys 0 .. t0 + i
    bias = np.triu(np.full((Tn, t1), -np.inf, dtype=x.dtype), k=t0 + 1)  # (Tn, t1)
    for i in range(cfg.n_layers):
        h = f"h.{i}."
        a, _ = L.layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
        qkv, _ = L.linear_forward(a, p[h + "attn.c_attn.weight"], p.get(h + "attn.c_attn.bias"))
        q, k, v = qkv.reshape(B, Tn, 3, NH, hs).transpose(2, 0, 3, 1, 4)    # 3 x (B, NH, Tn, hs)
        cache.k[i, :, :, t0:t1] = k
        cache.v[i, :, :, t0:t1] = v
        att = q @ cache.k[i, :, :, :t1].swapaxes(-1, -2)                   # (B, NH, Tn, t1)
        att *= 1.0 / math.sqrt(hs)
        att += bias
        L.softmax_inplace(att)
        y = (att @ cache.v[i, :, :, :t1]).transpose(0, 2, 1, 3).reshape(B * Tn, C)
        y, _ = L.linear_forward(y, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
        x = x + y
        m, _ = L.layernorm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
        m, _ = L.linear_forward(m, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])
        m, _ = L.gelu_forward(m)
        m, _ = L.linear_forward(m, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
        x = x + m
    cache.length = t1
    last = x.reshape(B, Tn, C)[:, -1]                                      # (B, C)
    last, _ = L.layernorm_forward(last, p["ln_f.weight"], p["ln_f.bias"])
    return last @ model.head_weight().T                                    # (B, V)


def generate(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id, seed,
             use_cache=True):
    """The sampling loop (arguments checked by npgpt.generate). Dropout is off while generating.

    The cache holds absolute positions, so it serves while the sequence fits in context_size;
    past that the window slides, every position shifts, and the window is recomputed.
    """
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(seed)
    out = idx
    finished = np.zeros(idx.shape[0], dtype=bool)
    cache = None
    try:
        for _ in range(max_new_tokens):
            if use_cache and cache is not None and out.shape[1] <= context_size:
                logits = forward_cached(model, out[:, -1:], cache)
            else:
                window = out[:, -context_size:]
                if use_cache and window.shape[1] < context_size:
                    cache = KVCache(model.cfg, out.shape[0], context_size, model.dtype)
                    logits = forward_cached(model, window, cache)
                else:
                    cache = None
                    logits = model.logits(window)[:, -1]
            if temperature == 0:
                next_id = logits.argmax(axis=-1)
            else:
                next_id = sampling.sample(sampling.next_token_probs(logits, temperature, top_k, top_p), rng)
            if eos_id is not None:
                next_id = np.where(finished, eos_id, next_id)
                finished |= next_id == eos_id
            out = np.concatenate([out, next_id[:, None].astype(np.int64)], axis=1)
            if eos_id is not None and finished.all():
                break
    finally:
        model.training = was_training
    return out
