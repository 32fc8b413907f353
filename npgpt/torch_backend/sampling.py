"""Decoding in torch: npgpt.sampling's temperature / top-k / top-p rules on the model's device, and
the sampler npgpt.sampling's loop calls for each new token.

The rules are npgpt.sampling.next_token_probs' (the reference); the parity suite checks that the
two agree. Shapes: B batch, T tokens, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sampling import check_logits, check_sampling_args


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None) -> torch.Tensor:
    """logits (..., V) -> probabilities (..., V), in float64, by npgpt.sampling.next_token_probs' rules."""
    logits = logits.to(torch.float64)
    V = logits.size(-1)
    check_sampling_args(V, temperature, top_k, top_p)
    check_logits(bool(torch.isnan(logits).any() | torch.isposinf(logits).any()),
                 bool(torch.isfinite(logits).any(dim=-1).all()))
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


def sampler(seed, device):
    """pick(logits (B, V) on the device, temperature, top_k, top_p) -> next ids (B,) as NumPy:
    argmax, or a draw with a torch Generator on the device, seeded once per generate() call."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))

    def pick(logits, temperature, top_k, top_p):
        if temperature == 0:
            check_logits(bool(torch.isnan(logits).any() | torch.isposinf(logits).any()), True)
            next_id = logits.argmax(dim=-1)                         # the first of ties
        else:
            next_id = sample(next_token_probs(logits, temperature, top_k, top_p), generator)
        return next_id.cpu().numpy()
    return pick
