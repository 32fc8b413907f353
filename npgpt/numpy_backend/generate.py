"""Generation in NumPy: the forward step with a KV cache, and the sampler (npgpt.sampling runs the loop).

Training recomputes keys and values for every position; generating token t+1 only needs the
new token's query against the keys and values of tokens 0..t, which the cache keeps. Each new
token then costs O(T) attention work and one pass over the weights, instead of a full forward.
Shapes: B batch, T tokens, C channels, NH heads, hs head size.
"""
from __future__ import annotations

import math

import numpy as np

from .. import sampling
from . import layers
from . import reference as R


def forward_cached(model, idx, cache: sampling.KVCache) -> np.ndarray:
    """Run the new tokens idx (B, Tn) at positions cache.length.. -> logits of the last one (B, V)."""
    cfg, p = model.cfg, model.p
    fast = model.kernels == "fast"
    L = layers if fast else R                   # the model's kernels: layers.py or reference.py
    B, Tn = idx.shape
    C, NH, hs = cfg.emb_dim, cfg.n_heads, cfg.head_dim
    t0, t1 = cache.length, cache.length + Tn
    x = p["wte"][idx] + p["wpe"][t0:t1]                                   # (B, Tn, C)
    x = x.reshape(B * Tn, C)
    # new query i (position t0 + i) may look at cached keys 0 .. t0 + i
    bias = np.triu(np.full((Tn, t1), -np.inf, dtype=x.dtype), k=t0 + 1)  # (Tn, t1)
    for i in range(cfg.n_layers):
        h = f"h.{i}."
        a, _ = L.layernorm_forward(x, p[h + "ln_1.weight"], p.get(h + "ln_1.bias"))
        qkv, _ = L.linear_forward(a, p[h + "attn.c_attn.weight"], p.get(h + "attn.c_attn.bias"))
        q, k, v = qkv.reshape(B, Tn, 3, NH, hs).transpose(2, 0, 3, 1, 4)    # 3 x (B, NH, Tn, hs)
        k, v = cache.update(i, k, v)                                       # (B, NH, t1, hs)
        att = q @ k.swapaxes(-1, -2)                                       # (B, NH, Tn, t1)
        att *= 1.0 / math.sqrt(hs)
        att += bias
        att = layers.softmax_inplace(att) if fast else R.softmax_forward(att)[0]
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B * Tn, C)
        y, _ = L.linear_forward(y, p[h + "attn.c_proj.weight"], p.get(h + "attn.c_proj.bias"))
        x = x + y
        m, _ = L.layernorm_forward(x, p[h + "ln_2.weight"], p.get(h + "ln_2.bias"))
        m, _ = L.linear_forward(m, p[h + "mlp.c_fc.weight"], p.get(h + "mlp.c_fc.bias"))
        m, _ = L.gelu_forward(m)
        m, _ = L.linear_forward(m, p[h + "mlp.c_proj.weight"], p.get(h + "mlp.c_proj.bias"))
        x = x + m
    cache.length = t1
    last = x.reshape(B, Tn, C)[:, -1]                                      # (B, C)
    last, _ = L.layernorm_forward(last, p["ln_f.weight"], p.get("ln_f.bias"))
    return L.linear_forward(last, model.head_weight())[0]                  # (B, V)


def sampler(seed):
    """pick(logits (B, V), temperature, top_k, top_p) -> next ids (B,): argmax, or a draw from
    npgpt.sampling's distribution with a NumPy generator seeded once per generate() call."""
    rng = np.random.default_rng(seed)

    def pick(logits, temperature, top_k, top_p):
        if temperature == 0:
            sampling.check_logits(np.isnan(logits).any() or np.isposinf(logits).any(), True)
            return logits.argmax(axis=-1)
        return sampling.sample(sampling.next_token_probs(logits, temperature, top_k, top_p), rng)
    return pick
