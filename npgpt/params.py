"""Parameter names and shapes (GPT-2's names, PyTorch's (out, in) layout) and the seeded initialisation.

Both backends start from the arrays made here, so they agree by construction.
"""
from __future__ import annotations

import math

import numpy as np

from .config import GPTConfig


def param_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's GPT-2 name and shape, weights in PyTorch's (out, in) layout, in model order.
    cfg.bias=False (nanoGPT's) leaves out every *.bias, of the LayerNorms and of the Linears."""
    V, T, C = cfg.vocab_size, cfg.context_length, cfg.emb_dim
    shapes = {"wte": (V, C), "wpe": (T, C)}

    def add(name, weight_shape, bias=cfg.bias):
        shapes[name + ".weight"] = weight_shape
        if bias:
            shapes[name + ".bias"] = weight_shape[:1]
    for i in range(cfg.n_layers):
        h = f"h.{i}."
        add(h + "ln_1", (C,))
        add(h + "attn.c_attn", (3 * C, C), bias=cfg.qkv_bias)
        add(h + "attn.c_proj", (C, C))
        add(h + "ln_2", (C,))
        add(h + "mlp.c_fc", (4 * C, C))
        add(h + "mlp.c_proj", (C, 4 * C))
    add("ln_f", (C,))
    if not cfg.tie_weights:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def param_role(name: str) -> str:
    """What a parameter is, read from its GPT-2 name: "embedding" (wte, wpe), "norm" (a LayerNorm's
    scale or shift), "bias" (a linear layer's), or "matmul" (a linear layer's weight, lm_head).
    The one rule behind initialisation, weight decay and the FLOPs count."""
    if name in ("wte", "wpe"):
        return "embedding"
    if ".ln_" in name or name.startswith("ln_f"):
        return "norm"
    return "bias" if name.endswith(".bias") else "matmul"


DECAY_GROUPS = ("all", "matrices", "none")


def decays(name: str, decay: str) -> bool:
    """Whether AdamW(decay=...) applies weight decay to the parameter: "all" decays every one (the
    book's torch.optim.AdamW(model.parameters(), weight_decay=0.1)); "matrices" every tensor of 2
    or more dimensions, the linear weights and the embeddings (nanoGPT's and llm.c's GPT-2 runs),
    exempting biases and LayerNorm; "none" none."""
    if decay not in DECAY_GROUPS:
        raise ValueError(f"decay must be one of {DECAY_GROUPS}, got {decay!r}")
    return decay == "all" or decay == "matrices" and param_role(name) in ("matmul", "embedding")


def num_params(cfg: GPTConfig) -> int:
    """Number of trainable parameters (a tied head is counted once)."""
    total = 0
    for shape in param_shapes(cfg).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def init_params(cfg: GPTConfig, seed: int = 123, dtype="float32") -> dict[str, np.ndarray]:
    """GPT-2's initialisation: weights N(0, 0.02), the two residual projections of each block
    scaled by 1/sqrt(2 * n_layers), biases 0, LayerNorm scale 1; the embeddings wte and wpe
    N(0, cfg.emb_init_std).

    The book's presets keep nn.Embedding's N(0, 1) embeddings (emb_init_std=1.0): with GPT-2's
    0.02 the book's run (lr 5e-4, no warmup, batch 2) stalls at the unigram loss (train 5.8 after
    65 steps, measured in both backends), with N(0, 1) it learns as in the book (3.55 after 36).
    The GPT-2 presets use 0.02, whose tied head would otherwise start with huge logits.

    Values are drawn in float32 and then cast, so a float64 model starts from exactly the
    same numbers as a float32 one.
    """
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    params = {}
    for name, shape in param_shapes(cfg).items():
        role = param_role(name)
        if role == "bias" or role == "norm" and name.endswith(".bias"):
            p = np.zeros(shape, dtype)
        elif role == "norm":
            p = np.ones(shape, dtype)
        else:
            if role == "embedding":
                std = cfg.emb_init_std
            elif name.endswith("c_proj.weight"):
                std = residual_std
            else:
                std = 0.02
            p = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(dtype, copy=False)
        params[name] = p
    return params


def check_params(params: dict, shapes: dict[str, tuple]) -> None:
    """Strict loading: the same names, and each array of the expected shape and of a floating-point
    dtype (an integer, bool, complex or object array is refused, not cast)."""
    missing = [n for n in shapes if n not in params]
    unexpected = [n for n in params if n not in shapes]
    if missing or unexpected:
        raise ValueError(f"parameter names do not match the model: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for name, shape in shapes.items():
        got = tuple(np.shape(params[name]))
        if got != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {got}")
        dtype = getattr(params[name], "dtype", None)
        dtype = np.asarray(params[name]).dtype if dtype is None else dtype
        # a NumPy dtype has a kind, a torch dtype says is_floating_point
        if not (dtype.is_floating_point if hasattr(dtype, "is_floating_point") else np.dtype(dtype).kind == "f"):
            raise ValueError(f"{name}: dtype {dtype}; expected a floating-point array (float16, float32 or float64)")
