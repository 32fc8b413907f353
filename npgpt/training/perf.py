"""How much work a training step is, and how much the device could do: FLOPs per token, and the
GPUs' peak FLOP/s, for tokens/s and model FLOPs utilisation (MFU)."""
from __future__ import annotations

import math

from ..config import GPTConfig
from ..params import param_role, param_shapes


def matmul_weights(cfg: GPTConfig) -> int:
    """Weights used in matrix products: every linear layer and the head (wte again when tied)."""
    n = sum(math.prod(shape) for name, shape in param_shapes(cfg).items() if param_role(name) == "matmul")
    return n + (cfg.vocab_size * cfg.emb_dim if cfg.tie_weights else 0)


def flops_per_token(cfg: GPTConfig, T: int) -> float:
    """Training FLOPs per token at sequence length T: 6 per matmul weight (forward 2, backward 4)
    plus attention's q @ k^T and att @ v, 12 * L * T * C."""
    return 6 * matmul_weights(cfg) + 12 * cfg.n_layers * T * cfg.emb_dim


PRECISIONS = ("bf16", "tf32", "fp32", "fp64")

# Dense peaks in TFLOP/s from NVIDIA's data sheets (which print tensor-core figures with 2:4
# sparsity: halved here), keyed by the exact name torch.cuda.get_device_name() reports:
# (bf16 tensor cores with fp32 accumulation, tf32 tensor cores, fp32 without tensor cores, fp64 --
# on tensor cores where the GPU has them, None where the data sheet gives no figure).
_SXM_HOPPER = (989.5, 494.5, 67.0, 67.0)       # H100 SXM5 and H200 SXM: one die, one clock
_NVL_HOPPER = (835.5, 417.5, 60.0, 60.0)       # H100 NVL and H200 NVL, per GPU
_A100 = (312.0, 156.0, 19.5, 19.5)             # SXM4 and PCIe, 40 and 80 GB alike
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": _SXM_HOPPER,      # H100 SXM5
    "NVIDIA H100 SXM5 80GB": _SXM_HOPPER,
    "NVIDIA H100 PCIe": (756.5, 378.0, 51.0, 51.0),
    "NVIDIA H100 NVL": _NVL_HOPPER,
    "NVIDIA H200": _SXM_HOPPER,
    "NVIDIA H200 NVL": _NVL_HOPPER,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA L4": (121.0, 60.0, 30.3, None),
    "NVIDIA L40S": (362.05, 183.0, 91.6, None),
    "NVIDIA A10": (125.0, 62.5, 31.2, None),
    "NVIDIA A10G": (70.0, 35.0, 35.0, None),   # AWS's variant: half the A10's tensor rate
    "NVIDIA GeForce RTX 4090": (165.2, 82.6, 82.6, None),   # bf16 with fp32 accumulation (330 is fp16's)
}
_BY_NAME = {name.lower(): peaks for name, peaks in PEAK_TFLOPS.items()}


def peak_flops(device_name: str, precision: str) -> float | None:
    """The GPU's dense peak FLOP/s at a matmul precision ('bf16', 'tf32', 'fp32', 'fp64'), looked up
    by its exact name (case and surrounding spaces aside); None for a GPU not in PEAK_TFLOPS, or a
    precision its data sheet has no figure for. No guessing from part of a name: "NVIDIA L40S"
    contains "L4", and an H100 PCIe is not an H100 SXM."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    peaks = _BY_NAME.get(str(device_name).strip().lower())
    if peaks is None or peaks[PRECISIONS.index(precision)] is None:
        return None
    return peaks[PRECISIONS.index(precision)] * 1e12
