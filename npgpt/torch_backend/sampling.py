"""Decoding in torch: npgpt.sampling's temperature / top-k / top-p rules, and the generation loop
with a KV cache, run entirely on the model's device.

The rules are npgpt.sampling.next_token_probs' (the reference); the parity suite checks that the
two agree. Shapes: B batch, T tokens, V vocabulary.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..sampling import check_sampling_args
from .model import KVCache


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None) -> torch.Tensor:
    """logits (..., V) -> probabilities (..., V), in float64, by npgpt.sampling.next_token_probs' rules."""
    logits = logits.to(torch.float64)
    V = logits.size(-1)
    check_sampling_args(V, temperature, top_k, top_p)
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), V).to(torch.float64)   # argmax: the first of ties
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]        # (..., 1) the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))        # ties with it are kept
    z = (logits - logits.amax(dim=-1, keepdim=True)) / temperature    # <= 0: no overflow for tiny T
    probs = torch.softmax(z, dim=-1)
    if top_p is not None and top_p < 1.0:
        # descending, ties by lower token id; keep a token while the more likely ones hold < top_p
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < top_p)
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of probs (B, V) -> (B,) token ids."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id, seed,
             use_cache=True):
    """The sampling loop of npgpt.numpy_backend.generate, in torch (arguments checked by
    npgpt.generate). Dropout is off while generating; the training flag is restored after.

    The cache holds absolute positions, so it serves while the sequence fits in context_size;
    past that the window slides, every position shifts, and the window is recomputed.
    """
    module, device = model.module, model.device
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    out = torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(device)   # (B, T)
    finished = torch.zeros(out.size(0), dtype=torch.bool, device=device)
    cache = None
    cache_dtype = torch.bfloat16 if model.autocast == "bf16" else module.wte.dtype   # k, v as computed
    try:
        with model.autocast_context():
            for _ in range(max_new_tokens):
                if use_cache and cache is not None and out.size(1) <= context_size:
                    logits = module(out[:, -1:], cache=cache)[:, -1]        # (B, V)
                else:
                    window = out[:, -context_size:]
                    if use_cache and window.size(1) < context_size:
                        cache = KVCache(model.cfg, out.size(0), context_size, cache_dtype, device)
                        logits = module(window, cache=cache)[:, -1]
                    else:
                        cache = None
                        logits = module(window)[:, -1]
                if temperature == 0:
                    next_id = logits.argmax(dim=-1)                         # (B,)
                else:
                    next_id = sample(next_token_probs(logits, temperature, top_k, top_p), generator)
                if eos_id is not None:
                    next_id = torch.where(finished, eos_id, next_id)
                    finished |= next_id == eos_id
                out = torch.cat([out, next_id[:, None]], dim=1)              # (B, T + 1)
                if eos_id is not None and bool(finished.all()):
                    break
    finally:
        model.training = was_training
    return out.cpu().numpy()
