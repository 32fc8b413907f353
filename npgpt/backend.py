"""The backend interface: build_model() and AdamW() pick the NumPy or the PyTorch implementation.

Both backends hold the same flat dict of GPT-2-named parameters and offer the same methods
(logits, loss, loss_and_grads, params, load_params, train, eval, train_step, clip_grad_norm,
generate). torch is imported only when the torch backend is asked for.
"""
from __future__ import annotations

import math

from .config import GPTConfig
from .params import init_params

BACKENDS = ("numpy", "torch")


class Backend:
    """What both models share. Each backend provides forward_backward(inputs, targets) -> float
    (the mean loss, leaving the gradients in the model) and clip_grad_norm(max_norm); the step
    built from them is written once, here."""

    peak_flops = None     # the device's dense matmul FLOP/s at the training precision, when known

    def flops_per_token(self, T: int) -> float:
        """Training FLOPs per token at sequence length T: 6 per weight used in a matrix product
        (forward 2, backward 4) plus attention's q @ k^T and att @ v, 12 * L * T * C."""
        cfg = self.cfg
        weights = sum(math.prod(shape) for name, shape in self.shapes.items()
                      if name.endswith("weight") and len(shape) == 2)   # linear layers and lm_head
        if cfg.tie_weights:
            weights += cfg.vocab_size * cfg.emb_dim        # wte, used as the head
        return 6 * weights + 12 * cfg.n_layers * T * cfg.emb_dim

    def train_step(self, inputs, targets, optimizer, clip_norm: float | None = None) -> float:
        """Forward, backward, optional gradient clipping, one optimizer step; returns the loss.
        A NaN or infinite loss raises FloatingPointError before the parameters are touched."""
        loss = self.forward_backward(inputs, targets)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss}; the optimizer step was skipped")
        if clip_norm is not None:
            self.clip_grad_norm(clip_norm)
        optimizer.step()
        return loss


def build_model(cfg: GPTConfig, backend: str = "numpy", seed: int = 123, dtype: str = "float32",
                device: str | None = None, params: dict | None = None, **torch_options):
    """A GPT-2 model initialised from the seed (or from params, a dict of NumPy arrays).

    torch_options (torch backend only): compile=True for torch.compile, autocast="bf16" on CUDA,
    grad_accum=k to run each batch as k micro-batches.
    """
    check_build_args(cfg, backend, dtype, device, torch_options)
    if params is None:
        params = init_params(cfg, seed, dtype)
    if backend == "numpy":
        from .numpy_backend import NumpyGPT
        return NumpyGPT(cfg, params, dtype=dtype, seed=seed)
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
        if torch_options:
            raise ValueError(f"options {sorted(torch_options)} apply to the torch backend only")


def AdamW(model, lr: float = 5e-4, weight_decay: float = 0.1, betas=(0.9, 0.999), eps: float = 1e-8,
          decay_all: bool = True):
    """AdamW for the model's backend, with torch.optim.AdamW's semantics and defaults.

    decay_all=True decays every parameter (the book's setting); False exempts biases,
    LayerNorm parameters and the embeddings.
    """
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("eps", eps)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if model.backend == "numpy":
        from .numpy_backend import AdamW as NumpyAdamW
        return NumpyAdamW(model, lr, weight_decay, betas, eps, decay_all)
    from .torch_backend import make_adamw
    return make_adamw(model, lr, weight_decay, betas, eps, decay_all)
