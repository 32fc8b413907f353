"""`npgpt gradcheck`: every hand-written gradient of the NumPy backend against finite differences.

Run it after you change the math in numpy_backend/reference.py or gpt2.py (--kernels reference)
or layers.py (the default, --kernels fast). It builds a small float64 model with
dropout, takes one batch's gradients from the hand-written backward, and compares each parameter
tensor with fourth-order central differences of the loss on a few of its entries (always the
largest), and with PyTorch autograd on every entry when torch is installed. One row per tensor,
in model order; the names of the tensors that fail come back (and the command exits 1).

Gradients flow from the loss backwards, so a wrong backward corrupts the tensors used before the
broken layer and none after it: the broken layer comes right after the last FAIL row (a wrong
gelu_backward fails everything up to h.1.mlp.c_fc.bias, the last block's c_fc).
"""
from __future__ import annotations

import importlib.util
import zlib

import numpy as np

from .config import PRESETS, GPTConfig
from .numpy_backend import NumpyGPT
from .params import init_params

DROP_RATE = 0.1
BATCH, SEQ_LEN = 2, 8
STRATA, RANDOM_EXTRA = 6, 2   # entries of each tensor checked by finite differences (see sampled_entries)
# Finite-difference step: the error of the 4th-order formula is truncation O(STEP^4) plus rounding
# of the loss (about 1e-15 / STEP); measured on tiny, 1e-3 gives about 1e-12 absolute, 1e-4 ten
# times more and 3e-3 already truncation error.
STEP = 1e-3
# A pass is |analytic - reference| <= ATOL + RTOL * |reference|, and the table shows the largest
# |analytic - reference| / (ATOL / RTOL + |reference|), so an error above RTOL fails. Measured on
# tiny: the correct code reaches 1.3e-8 against finite differences and 7e-12 against torch's
# float64 autograd; a 1% error in gelu_backward 6e-4 and 1e-2, the other bugs tried far more.
FD_ATOL, FD_RTOL = 1e-10, 1e-6
TORCH_ATOL, TORCH_RTOL = 1e-14, 1e-9


def fixed_dropout_masks(seed: int, p: float):
    """fn(name, shape) -> bool keep-mask, the same array every time it is asked for a name.

    With masks drawn afresh on every forward the loss would change between the evaluations of a
    finite difference and the differences would be noise; fixed masks make the loss a
    deterministic function of the parameters, and give torch the very same masks.
    """
    masks = {}

    def keep(name, shape):
        if name not in masks:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            masks[name] = rng.random(shape) >= p
        return masks[name]
    return keep


def numeric_grad(loss, x, index, step=STEP) -> float:
    """Fourth-order central difference of loss() with respect to x[index]; x is restored."""
    old = x[index]
    f = []
    for k in (2, 1, -1, -2):
        x[index] = old + k * step
        f.append(loss())
    x[index] = old
    return (-f[0] + 8 * f[1] - 8 * f[2] + f[3]) / (12 * step)


def sampled_entries(grad, rng, strata=STRATA, extra=RANDOM_EXTRA) -> np.ndarray:
    """Flat indices: the largest |grad| in each of `strata` equal slices of the flattened tensor
    (so the largest entry overall, and in c_attn each of the q, k and v blocks, which a bug in
    one of them would otherwise hide behind the others), plus `extra` random entries."""
    flat = np.abs(grad).reshape(-1)
    bounds = np.linspace(0, flat.size, min(strata, flat.size) + 1).astype(int)
    largest = [lo + int(np.argmax(flat[lo:hi])) for lo, hi in zip(bounds[:-1], bounds[1:])]
    random = rng.choice(flat.size, min(extra, flat.size), replace=False)
    return np.union1d(largest, random)


def max_rel_error(analytic, reference, atol, rtol) -> float:
    """max |analytic - reference| / (atol / rtol + |reference|): at most rtol exactly when every
    entry is within atol + rtol * |reference|. NaN if any entry is NaN."""
    analytic, reference = np.asarray(analytic, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(analytic - reference) / (atol / rtol + np.abs(reference))))


def torch_grads(cfg, params, masks, x, y):
    """The torch backend's autograd gradients of the same loss (same params, same masks), or None
    when torch is not installed."""
    if importlib.util.find_spec("torch") is None:
        return None
    from npgpt import build_model
    model = build_model(cfg, backend="torch", dtype="float64", device="cpu", params=params)
    model.dropout_masks = masks
    _, grads = model.loss_and_grads(x, y)
    return grads


def gradcheck(preset: str = "tiny", seed: int = 123, print_fn=print, *, batch_size: int = BATCH,
              seq_len: int = SEQ_LEN, compare_torch: bool = True, kernels: str = "fast",
              **overrides) -> list[str]:
    """Check every parameter's gradient of one batch's loss; prints a table and a verdict line and
    returns the names of the failing parameters (empty when all pass).

    overrides replace fields of the preset (drop_rate is DROP_RATE unless given; a small
    vocab_size makes every loss far cheaper). compare_torch=False skips torch even when it is
    installed (the column then shows "-"). kernels: the NumPy model's layers, "fast" (layers.py)
    or "reference" (gpt2.py on reference.py's layers).
    """
    overrides = {"drop_rate": DROP_RATE, **overrides}
    cfg = GPTConfig.preset(preset, **overrides)
    T = min(seq_len, cfg.context_length)
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed, dtype="float64")
    # GPT-2 starts with zero biases and unit LayerNorm scales; a backward that forgets a bias or
    # a scale would still be right there, so move every parameter off its initial value.
    for p in params.values():
        p += rng.standard_normal(p.shape) * (0.3 if p.ndim == 1 else 0.05)
    x = rng.integers(0, cfg.vocab_size, (batch_size, T))                   # (B, T)
    y = rng.integers(0, cfg.vocab_size, (batch_size, T))                   # (B, T)
    masks = fixed_dropout_masks(seed, cfg.drop_rate)

    model = NumpyGPT(cfg, params, dtype="float64", seed=seed, kernels=kernels)
    model.dropout_masks = masks
    loss, grads = model.loss_and_grads(x, y)
    reference = torch_grads(cfg, params, masks, x, y) if compare_torch else None

    changed = ", ".join(f"{k}={v}" for k, v in overrides.items())
    print_fn(f"gradcheck: {kernels} kernels, preset {preset} ({changed}, fixed dropout masks), float64, "
             f"batch {batch_size} x {T} tokens, loss {loss:.6f}")
    print_fn("pass: |analytic - reference| <= atol + rtol * |reference|; the columns show the largest "
             "|analytic - reference| / (atol / rtol + |reference|), which fails above rtol")
    print_fn(f"  finite differences: {STRATA + RANDOM_EXTRA} entries a tensor, step {STEP:g}, "
             f"atol {FD_ATOL:g}, rtol {FD_RTOL:g}")
    print_fn(f"  torch autograd: every entry, atol {TORCH_ATOL:g}, rtol {TORCH_RTOL:g}" if reference is not None
             else f"  torch autograd: {'skipped' if not compare_torch else 'not installed'}")
    width = max(len(name) for name in grads)
    print_fn(f"{'parameter':<{width}}  {'vs finite diff':>14}  {'vs torch':>10}  result")
    failed = []
    for name, g in grads.items():
        p = model.param_views()[name]          # perturbed in place: the model's own buffer
        picked = [np.unravel_index(i, p.shape) for i in sampled_entries(g, rng)]
        numeric = [numeric_grad(lambda: model.loss(x, y), p, index) for index in picked]
        fd_err = max_rel_error([g[index] for index in picked], numeric, FD_ATOL, FD_RTOL)
        ok = fd_err <= FD_RTOL
        torch_col = "-"
        if reference is not None:
            torch_err = max_rel_error(g, reference[name], TORCH_ATOL, TORCH_RTOL)
            ok = ok and torch_err <= TORCH_RTOL
            torch_col = f"{torch_err:.1e}"
        if not ok:
            failed.append(name)
        print_fn(f"{name:<{width}}  {fd_err:>14.1e}  {torch_col:>10}  {'OK' if ok else 'FAIL'}")
    if failed:
        print_fn(f"gradcheck FAILED for {len(failed)} of {len(grads)} parameters: {', '.join(failed)}")
    else:
        print_fn(f"gradcheck passed: all {len(grads)} parameters OK")
    return failed


def add_arguments(parser) -> None:
    """The options of `npgpt gradcheck`, on an argparse (sub)parser."""
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS),
                        help="model size (default: tiny; larger presets take far longer)")
    parser.add_argument("--seed", type=int, default=123, help="parameters, batch and dropout masks "
                                                              "(default: 123)")
    parser.add_argument("--kernels", choices=("fast", "reference"), default="fast",
                        help="the layers to check: fast (layers.py, the default) or reference "
                             "(gpt2.py on reference.py)")


def run(args) -> int:
    """`npgpt gradcheck`: exit code 0 when every gradient passes, 1 when any fails."""
    return 1 if gradcheck(args.preset, args.seed, kernels=args.kernels) else 0
