"""What the torch backend does around the model's math so that it runs well on a GPU and leaves the
process as it found it: float32 matmuls in TF32 inside the model's own calls only, dropout drawn
from the model's own random stream, token ids copied to the GPU without waiting for it, and the
cross-entropy of bf16 logits without a float32 copy of them. Shapes: N rows (B*T), V vocabulary.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F


def cpu_bf16_missing() -> str | None:
    """Why bf16 autocast would crawl on this CPU, or None where it runs at speed. torch's CPU bf16
    matmuls go through oneDNN, which has fast kernels only on AVX-512 (AVX512-BF16, AMX, or
    AVX512 emulation); elsewhere it falls back to a slow path: five book-124m steps under bf16 took
    over 16 minutes on an AVX2-only EPYC, against 5.8 s a step in float32 (30x and more)."""
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return (f"this CPU has no fast bf16 matrix products (torch reports {torch.backends.cpu.get_cpu_capability()}, "
            "oneDNN bf16: no; it needs AVX-512, AVX512-BF16 or AMX), so bf16 autocast would run many times "
            "slower than float32")


def cuda_bf16_missing(device: torch.device) -> str | None:
    """Why bf16 autocast cannot run on this CUDA device (a GPU before Ampere: T4, V100), or None.
    torch can emulate bf16 on such a GPU, many times slower; emulation does not count here."""
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return None
    major, minor = torch.cuda.get_device_capability(device)
    return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no bf16; use "
            "autocast 'fp16' (with a GradScaler, as nanoGPT on such GPUs), or leave autocast out for float32")


def warn_if_slow_bf16(device: torch.device) -> None:
    """A RuntimeWarning when bf16 autocast is asked for on a CPU that lacks fast bf16 (cpu_bf16_missing)."""
    reason = device.type == "cpu" and cpu_bf16_missing()
    if reason:
        warnings.warn(f"autocast='bf16' on the CPU: {reason}", RuntimeWarning, stacklevel=4)


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """float32 matmuls on TF32 tensor cores inside the block, the process's own setting after it.
    torch 2.9+ has torch.backends.cuda.matmul.fp32_precision, and once it is used, reading the
    legacy allow_tf32 flags can raise RuntimeError; older releases have only allow_tf32."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    key, value = ("fp32_precision", "tf32") if hasattr(torch.backends, "fp32_precision") else ("allow_tf32", True)
    saved = getattr(matmul, key)
    setattr(matmul, key, value)
    try:
        yield
    finally:
        setattr(matmul, key, saved)


@contextlib.contextmanager
def dropout_stream(generator: torch.Generator, offset: int, device: torch.device, enabled: bool):
    """Run the block with torch's global RNG (nn.Dropout and SDPA's dropout draw from it, on the CPU
    and the GPU) seeded from one draw of the model's own generator plus offset, and give the
    global state back afterwards. Each forward pass with dropout thus advances the model's
    generator by exactly one draw, whatever the device or compiled kernels consume: its state alone
    (saved in checkpoints) decides every later mask. Under DDP every rank draws the same seed and
    adds its rank, so ranks use different masks yet keep identical generator states."""
    if not enabled:
        yield
        return
    seed = int(torch.randint(2**62, (), generator=generator)) + offset
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def to_device(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on the device. To a GPU it goes through pinned memory and is only queued
    (non_blocking): a copy from ordinary memory first waits for every kernel already queued,
    which would stall the host once per batch."""
    if device.type != "cuda":
        return ids.to(device)
    return ids.pin_memory().to(device, non_blocking=True)


ROWS = 1024   # rows of logits upcast at a time: 1024 x 50257 float32 is 206 MB


class Bf16CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of bf16 logits (N, V), in float32, ROWS rows at a time. F.cross_entropy
    under autocast first copies the logits to float32 and saves its float32 log-softmax for the
    backward: at B=8, T=1024 and GPT-2's vocabulary, 1.6 GB each beside the 0.8 GB logits. This
    keeps only each row's log-sum-exp (N,) and forms the gradient chunk by chunk."""

    @staticmethod
    def forward(ctx, logits, targets):                                    # (N, V) bf16, (N,) int64
        lse = torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in logits.split(ROWS)])  # (N,)
        picked = logits.gather(1, targets[:, None]).squeeze(1).float()  # (N,) the targets' logits
        ctx.save_for_backward(logits, targets, lse)
        return (lse - picked).mean()

    @staticmethod
    def backward(ctx, dloss):
        logits, targets, lse = ctx.saved_tensors
        dlogits = torch.empty_like(logits)                                # (N, V) bf16
        scale = dloss / logits.size(0)
        for start in range(0, logits.size(0), ROWS):
            rows = slice(start, start + ROWS)
            # loss = mean(lse - logits[target]): dlogits = (softmax(logits) - onehot(target)) / N
            p = torch.exp(logits[rows].float() - lse[rows, None])        # (ROWS, V) softmax
            p.scatter_add_(1, targets[rows, None], torch.full_like(lse[rows, None], -1.0))
            dlogits[rows] = p * scale
        return dlogits, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (N, V) against targets (N,), in float32 at least. Inside
    torch.compile the upcast is written out plainly: the compiled kernel fuses it, and keeps no
    float32 copy either."""
    if logits.dtype != torch.bfloat16:
        return F.cross_entropy(logits, targets)
    if torch.compiler.is_compiling():
        return F.cross_entropy(logits.float(), targets)
    return Bf16CrossEntropy.apply(logits, targets)
