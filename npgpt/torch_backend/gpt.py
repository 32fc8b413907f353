"""GPT-2 as a PyTorch nn.Module, in nanoGPT's shape: attention (SDPA, or written out for float64 and
injected dropout masks), MLP, blocks, and the model with its KV-cache path.

The module's parameter names are exactly npgpt.param_shapes' names ("wte", "h.0.attn.c_attn.weight",
"lm_head.weight", ...) in the same (out, in) layout, so moving weights between the backends is a
dict copy. Gradients come from autograd. Shapes: B batch, T time, C channels, NH heads, hs head
size, V vocabulary.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import GPTConfig
from ..sampling import KVCache
from .device import cross_entropy


class Dropout(nn.Dropout):
    """nn.Dropout that can take its keep-mask from outside, by name, so that the parity tests can
    give both backends identical masks. `masks` is None or fn(name, shape) -> bool tensor."""

    def __init__(self, p: float, name: str):
        super().__init__(p)
        self.name = name
        self.masks = None

    def forward(self, x):
        if self.masks is None or not self.training or self.p == 0.0:
            return super().forward(x)
        keep = self.masks(self.name, tuple(x.shape))
        return x * (keep.to(x.dtype) * (1.0 / (1.0 - self.p)))


def causal_mask(T, Tk, device):
    """(T, Tk) bool, True where a query may look: the T queries are the last T of Tk positions,
    so query i sees keys 0 .. Tk - T + i."""
    return torch.ones(T, Tk, dtype=torch.bool, device=device).tril(Tk - T)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.n_heads, self.layer = cfg.n_heads, layer
        self.c_attn = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.bias)
        self.attn_dropout = Dropout(cfg.drop_rate, f"h.{layer}.attn")

    def forward(self, x, cache: KVCache | None = None):
        B, T, C = x.shape
        NH, hs = self.n_heads, C // self.n_heads
        q, k, v = self.c_attn(x).split(C, dim=2)                      # 3 x (B, T, C)
        q = q.view(B, T, NH, hs).transpose(1, 2)                      # (B, NH, T, hs)
        k = k.view(B, T, NH, hs).transpose(1, 2)
        v = v.view(B, T, NH, hs).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                     # (B, NH, Tk, hs)
        Tk = k.size(2)
        if q.dtype != torch.float64 and self.attn_dropout.masks is None:
            # fused kernel (flash / memory-efficient on CUDA); same math, dropout from the global RNG
            p = self.attn_dropout.p if self.training else 0.0
            mask = None if T in (1, Tk) else causal_mask(T, Tk, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                               is_causal=T == Tk and T > 1)
        else:
            # the readable path, used in float64 and with injected dropout masks
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))   # (B, NH, T, Tk)
            if T > 1:
                att = att.masked_fill(~causal_mask(T, Tk, x.device), float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v                                               # (B, NH, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)                        # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim, bias=cfg.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LN transformer block; registration order gives param_shapes' order of names. With
    cfg.bias=False (nanoGPT's) no LayerNorm or Linear has a bias (nn.LayerNorm's bias= needs torch 2.1)."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.drop_1 = Dropout(cfg.drop_rate, f"h.{layer}.resid_1")
        self.ln_2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop_2 = Dropout(cfg.drop_rate, f"h.{layer}.resid_2")

    def forward(self, x, cache=None):
        x = x + self.drop_1(self.attn(self.ln_1(x), cache))
        x = x + self.drop_2(self.mlp(self.ln_2(x)))
        return x                                                      # (B, T, C)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Parameter(torch.empty(cfg.vocab_size, cfg.emb_dim))
        self.wpe = nn.Parameter(torch.empty(cfg.context_length, cfg.emb_dim))
        self.drop = Dropout(cfg.drop_rate, "emb")
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.emb_dim, eps=1e-5, bias=cfg.bias)
        self.lm_head = None if cfg.tie_weights else nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

    def set_dropout_masks(self, fn) -> None:
        for m in self.modules():
            if isinstance(m, Dropout):
                m.masks = fn

    def forward(self, idx, targets=None, cache: KVCache | None = None, last: bool = False):
        """idx (B, T) -> logits (B, T, V); with targets (B, T) -> mean cross-entropy; with a cache
        or last=True -> logits of the last position only (B, 1, V), in the weights' precision even
        under autocast: greedy decoding on bf16 logits (8 significant bits) would meet many ties."""
        B, T = idx.shape
        t0 = 0 if cache is None else cache.length
        if t0 + T > self.cfg.context_length:
            raise ValueError(f"sequence of {t0 + T} tokens is longer than context_length "
                             f"{self.cfg.context_length}")
        pos = torch.arange(t0, t0 + T, device=idx.device)
        x = self.drop(F.embedding(idx, self.wte) + F.embedding(pos, self.wpe))  # (B, T, C)
        for block in self.h:
            x = block(x, cache)
        if cache is not None:
            cache.length += T
        head = self.wte if self.lm_head is None else self.lm_head.weight
        if cache is not None or last:
            x = self.ln_f(x[:, -1:])                                  # (B, 1, C)
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x.to(head.dtype), head)               # (B, 1, V)
        logits = F.linear(self.ln_f(x), head)                         # (B, T, V)
        if targets is None:
            return logits
        return cross_entropy(logits.flatten(0, 1), targets.flatten())
