"""build_model() and AdamW(): pick the NumPy or the PyTorch implementation of the interface in base.py.

torch is imported only when the torch backend is asked for.
"""
from __future__ import annotations

from .config import GPTConfig
from .params import DECAY_GROUPS, init_params

BACKENDS = ("numpy", "torch")


def build_model(cfg: GPTConfig, backend: str = "numpy", seed: int = 123, dtype: str = "float32",
                device: str | None = None, params: dict | None = None, kernels: str = "fast", **torch_options):
    """A GPT-2 model initialised from the seed (or from params, a dict of NumPy arrays).

    kernels (numpy backend): "fast" (numpy_backend/layers.py) or "reference" (numpy_backend/gpt2.py,
    GPT-2 written with reference.py's layers, the textbook form; clipping and AdamW run on
    reference.py too).

    torch_options (torch backend only, but grad_accum): compile=True for torch.compile, autocast="bf16"
    (CUDA or CPU) or "fp16" (with a GradScaler), grad_accum=k to run each batch as k micro-batches
    (both backends).
    """
    check_build_args(cfg, backend, dtype, device, torch_options)
    if kernels != "fast" and backend != "numpy":
        raise ValueError(f"kernels={kernels!r} needs backend='numpy' (the torch backend's gradients are "
                         "autograd's)")
    if params is None:
        params = init_params(cfg, seed, dtype)
    if backend == "numpy":
        from .numpy_backend import NumpyGPT
        return NumpyGPT(cfg, params, dtype=dtype, seed=seed, kernels=kernels, **torch_options)
    from .torch_backend import TorchGPT
    return TorchGPT(cfg, params, dtype=dtype, seed=seed, device=device, **torch_options)


def check_build_args(cfg, backend, dtype, device, torch_options) -> None:
    """What build_model and the weight loaders accept, with errors that name the argument."""
    if not isinstance(cfg, GPTConfig):
        raise TypeError(f"cfg must be a GPTConfig, got {type(cfg).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if backend == "numpy":
        if device not in (None, "cpu"):
            raise ValueError(f"the numpy backend runs on the CPU; device={device!r} needs backend='torch'")
        if set(torch_options) - {"grad_accum"}:
            raise ValueError(f"options {sorted(set(torch_options) - {'grad_accum'})} apply to the torch backend only")


def AdamW(model, lr: float = 5e-4, weight_decay: float = 0.1, betas=(0.9, 0.999), eps: float = 1e-8,
          decay: str = "all"):
    """AdamW for the model's backend, with torch.optim.AdamW's semantics and defaults.

    decay: the parameters weight decay applies to (params.decays): "all" (the book's setting),
    "matrices" (every tensor of 2 or more dimensions, embeddings included, as nanoGPT and llm.c:
    biases and LayerNorm exempt) or "none".
    """
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("eps", eps)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if decay not in DECAY_GROUPS:
        raise ValueError(f"decay must be one of {DECAY_GROUPS}, got {decay!r}")
    if model.backend == "numpy":
        from .numpy_backend import AdamW as NumpyAdamW
        return NumpyAdamW(model, lr, weight_decay, betas, eps, decay)
    from .torch_backend import make_adamw
    return make_adamw(model, lr, weight_decay, betas, eps, decay)
