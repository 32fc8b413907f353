"""GPT-2 as a PyTorch nn.Module (nanoGPT's shape), and TorchGPT, the backend object around it.

The module's parameter names are exactly npgpt.param_shapes' names ("wte", "h.0.attn.c_attn.weight",
"lm_head.weight", ...) in the same (out, in) layout, so moving weights between the backends is a
dict copy. Gradients come from autograd. Shapes: B batch, T time, C channels, NH heads, hs head
size, V vocabulary.
"""
from __future__ import annotations

import base64
import contextlib
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backend import Backend
from ..config import GPTConfig
from ..params import check_params, param_shapes
from ..tokenizer import check_token_ids

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


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


class KVCache:
    """Keys and values of every layer for the first `length` positions, preallocated for
    `capacity` positions: k[i], v[i] are (B, NH, capacity, hs)."""

    def __init__(self, cfg: GPTConfig, batch_size: int, capacity: int, dtype, device):
        shape = (batch_size, cfg.n_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.length = 0   # advanced by GPT.forward once every layer has stored its new positions

    def update(self, layer: int, k, v):
        """Store the new positions' k, v (B, NH, Tn, hs) -> all keys and values so far (B, NH, t1, hs)."""
        t0, t1 = self.length, self.length + k.size(2)
        self.k[layer][:, :, t0:t1] = k
        self.v[layer][:, :, t0:t1] = v
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]


def causal_mask(T, Tk, device):
    """(T, Tk) bool, True where a query may look: the T queries are the last T of Tk positions,
    so query i sees keys 0 .. Tk - T + i."""
    return torch.ones(T, Tk, dtype=torch.bool, device=device).tril(Tk - T)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.n_heads, self.layer = cfg.n_heads, layer
        self.c_attn = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
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
        self.c_fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.c_proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LN transformer block; registration order gives param_shapes' order of names."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.attn = CausalSelfAttention(cfg, layer)
        self.drop_1 = Dropout(cfg.drop_rate, f"h.{layer}.resid_1")
        self.ln_2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
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
        self.ln_f = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.lm_head = None if cfg.tie_weights else nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

    def set_dropout_masks(self, fn) -> None:
        for m in self.modules():
            if isinstance(m, Dropout):
                m.masks = fn

    def forward(self, idx, targets=None, cache: KVCache | None = None):
        """idx (B, T) -> logits (B, T, V); with targets (B, T) -> mean cross-entropy;
        with a cache -> logits of the last position only (B, 1, V)."""
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
            x = x[:, -1:]                                             # (B, 1, C)
        x = self.ln_f(x)
        logits = F.linear(x, self.wte if self.lm_head is None else self.lm_head.weight)  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# dense tensor-core FLOP/s per GPU from the vendors' data sheets: (bf16, tf32) for the MFU estimate
PEAK_FLOPS = {"H100": (989e12, 495e12), "H200": (989e12, 495e12), "A100": (312e12, 156e12),
              "L4": (121e12, 60e12), "A10": (125e12, 62.5e12)}


def cuda_peak_flops(device, bf16: bool):
    """The device's peak FLOP/s at the training precision, if it is a GPU we know; else None."""
    name = torch.cuda.get_device_name(device)
    for key, (bf16_peak, tf32_peak) in PEAK_FLOPS.items():
        if key in name:
            return bf16_peak if bf16 else tf32_peak
    return None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy copy of a tensor on any device."""
    return t.detach().to("cpu", copy=True).numpy()


class TorchGPT(Backend):
    """The torch backend behind npgpt's interface (the same methods as NumpyGPT); arrays in and
    out are NumPy, everything in between stays on the device."""

    backend = "torch"

    def __init__(self, cfg: GPTConfig, params: dict[str, np.ndarray], dtype="float32", seed: int = 123,
                 device: str | None = None, compile: bool = False, autocast: str | None = None,
                 grad_accum: int = 1):
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
            raise ValueError(f"grad_accum must be a positive integer, got {grad_accum!r}")
        self.grad_accum = grad_accum      # a batch runs as this many micro-batches (less activation memory)
        self.peak_flops = None
        self.cfg, self.dtype, self.shapes = cfg, np.dtype(dtype), param_shapes(cfg)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if autocast not in (None, "bf16"):
            raise ValueError(f"autocast must be None or 'bf16', got {autocast!r}")
        if autocast and self.device.type != "cuda":
            raise ValueError(f"autocast='bf16' needs a CUDA device, got device {str(self.device)!r}")
        self.autocast = autocast
        if self.device.type == "cuda":
            self.peak_flops = cuda_peak_flops(self.device, bf16=autocast == "bf16")
        if self.device.type == "cuda" and dtype == "float32":
            torch.backends.cuda.matmul.allow_tf32 = True   # TF32 tensor cores for float32 matmuls
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(seed)                            # dropout draws from the global RNG
        with torch.device("meta"):                         # no throwaway default initialisation
            module = GPT(cfg)
        self.module = module.to(TORCH_DTYPES[dtype]).to_empty(device=self.device)
        assert [(n, tuple(p.shape)) for n, p in self.module.named_parameters()] == \
            [(n, tuple(s)) for n, s in self.shapes.items()], "module parameters != param_shapes"
        self.load_params(params)
        self._step_module = torch.compile(self.module) if compile else self.module
        self._dropout_masks = None
        self.ranks = None      # under torchrun: distributed.Ranks, which wraps _step_module in DDP
        self.train()

    # ---- training flag and dropout masks ----

    @property
    def training(self) -> bool:
        return self.module.training

    @training.setter
    def training(self, mode: bool) -> None:
        self.module.train(mode)

    def train(self):
        self.module.train()
        return self

    def eval(self):
        self.module.eval()
        return self

    @property
    def dropout_masks(self):
        """None, or fn(name, shape) -> NumPy bool keep-mask, asked for instead of the RNG (tests)."""
        return self._dropout_masks

    @dropout_masks.setter
    def dropout_masks(self, fn) -> None:
        self._dropout_masks = fn
        self.module.set_dropout_masks(None if fn is None else self._torch_masks(fn))

    def _torch_masks(self, fn):
        def masks(name, shape):
            keep = np.asarray(fn(name, shape), dtype=bool)
            if keep.shape != shape:
                raise ValueError(f"dropout mask {name}: expected shape {shape}, got {keep.shape}")
            return torch.from_numpy(keep).to(self.device)
        return masks

    # ---- parameters ----

    def params(self) -> dict[str, np.ndarray]:
        return {name: to_numpy(p) for name, p in self.module.named_parameters()}

    def load_params(self, params: dict[str, np.ndarray]) -> None:
        check_params(params, self.shapes)
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                p.copy_(torch.from_numpy(np.ascontiguousarray(params[name])))

    # ---- the interface shared with the NumPy backend ----

    def _ids(self, ids, what="inputs") -> torch.Tensor:
        ids = check_token_ids(ids, self.cfg.vocab_size, what, self.cfg.context_length)
        return torch.from_numpy(ids).to(self.device)

    def autocast_context(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast == "bf16")

    def logits(self, idx) -> np.ndarray:
        with torch.no_grad(), self.autocast_context():
            logits = self.module(self._ids(idx))                       # (B, T, V)
        return to_numpy(logits.to(TORCH_DTYPES[self.dtype.name]))

    def loss(self, inputs, targets) -> float:
        with torch.no_grad(), self.autocast_context():
            return self._reported(self.module(self._ids(inputs), self._ids(targets, "targets")), inputs)

    def _reported(self, loss: torch.Tensor, inputs) -> float:
        """The loss as a float; under torchrun, the mean over the windows of every rank's batch."""
        if self.ranks is None:
            return loss.item()
        return self.ranks.mean_loss(loss, 1 if np.ndim(inputs) == 1 else len(inputs))

    def _forward_backward(self, inputs, targets) -> torch.Tensor:
        """The batch's mean loss and its gradients. With grad_accum = k the batch runs as k equal
        micro-batches, each loss scaled by 1/k, so the gradients sum to the whole batch's; under DDP
        only the last backward exchanges gradients (no_sync)."""
        inputs, targets = self._ids(inputs), self._ids(targets, "targets")
        k = self.grad_accum
        if len(inputs) % k:
            raise ValueError(f"batch of {len(inputs)} sequences does not split into grad_accum={k} equal parts")
        self.module.zero_grad(set_to_none=True)
        total = 0.0
        for i, (x, y) in enumerate(zip(inputs.chunk(k), targets.chunk(k))):
            last = i == k - 1
            sync = contextlib.nullcontext() if last or self.ranks is None else self._step_module.no_sync()
            with sync:
                with self.autocast_context():
                    loss = self._step_module(x, y) / k
                loss.backward()
            total = total + loss.detach()
        return total

    def forward_backward(self, inputs, targets) -> float:
        """Mean cross-entropy of one batch; leaves its gradients in the module (averaged over ranks
        under DDP)."""
        return self._reported(self._forward_backward(inputs, targets), inputs)

    def loss_and_grads(self, inputs, targets):
        loss = self.forward_backward(inputs, targets)
        return loss, {name: to_numpy(p.grad) for name, p in self.module.named_parameters()}

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before."""
        return float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))

    def rng_state(self) -> dict:
        """torch's global RNG state (dropout draws from it), JSON-serialisable, for checkpoints."""
        state = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
        if self.device.type == "cuda":
            state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(self.device).numpy().tobytes()).decode()
        return state

    def set_rng_state(self, state: dict) -> None:
        decode = lambda s: torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())
        torch.set_rng_state(decode(state["cpu"]))
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(decode(state["cuda"]), self.device)

    def generate(self, idx, **kwargs):
        from .sampling import generate
        return generate(self, idx, **kwargs)
