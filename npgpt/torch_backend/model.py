"""TorchGPT: the torch backend behind npgpt's interface, around the nn.Module of gpt.py.

NumPy arrays in and out; parameters, gradients and AdamW state stay on the device. Shapes: B batch,
T time, V vocabulary.
"""
from __future__ import annotations

import base64
import contextlib
import math

import numpy as np
import torch

from ..base import Backend
from ..config import GPTConfig, check_token_ids
from ..memory import keep_freed_memory
from ..params import check_params, param_shapes
from ..sampling import KVCache
from ..training.perf import peak_flops
from .device import cuda_bf16_missing, dropout_stream, tf32_matmuls, to_device, warn_if_slow_bf16
from .gpt import GPT

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy copy of a tensor on any device."""
    return t.detach().to("cpu", copy=True).numpy()


class TorchGPT(Backend):
    """The torch backend behind npgpt's interface (the same methods as NumpyGPT); arrays in and
    out are NumPy, everything in between stays on the device.

    autocast="bf16" runs the matrix products in bfloat16 under torch.autocast, on CUDA or on the
    CPU (fast where the CPU has AVX512-BF16 or AMX; parameters, gradients and AdamW stay float32);
    a CUDA device without bf16 (before Ampere) refuses it. autocast="fp16" runs them in float16,
    for such GPUs, with a torch.amp.GradScaler (self.scaler) scaling the loss so that small
    gradients survive float16, and skipping a step whose gradients overflow (saved with the
    optimizer's state in checkpoints).
    A process-wide choice made when a model is built: freed memory is kept for reuse
    (npgpt.memory.keep_freed_memory), the same setting the NumPy backend makes; on the CPU, torch's
    allocator is glibc's malloc, and without it a 124M step pays 250,000 to 400,000 page faults.
    """

    backend = "torch"

    def __init__(self, cfg: GPTConfig, params: dict[str, np.ndarray], dtype="float32", seed: int = 123,
                 device: str | None = None, compile: bool = False, autocast: str | None = None,
                 grad_accum: int = 1):
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
            raise ValueError(f"grad_accum must be a positive integer, got {grad_accum!r}")
        self.grad_accum = grad_accum      # a batch runs as this many micro-batches (less activation memory)
        self.cfg, self.dtype, self.shapes = cfg, np.dtype(dtype), param_shapes(cfg)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if autocast not in (None, *AUTOCAST_DTYPES):
            raise ValueError(f"autocast must be None, 'bf16' or 'fp16', got {autocast!r}")
        if autocast and dtype == "float64":
            raise ValueError(f"autocast={autocast!r} with dtype='float64': autocast never casts float64, so the "
                             f"model would run in float64; use dtype='float32' with autocast={autocast!r}, or "
                             "dtype='float64' without autocast")
        if autocast and self.device.type not in ("cuda", "cpu"):
            raise ValueError(f"autocast={autocast!r} runs on CUDA or the CPU, got device {str(self.device)!r}")
        if autocast == "bf16" and cuda_bf16_missing(self.device):
            raise ValueError(f"autocast='bf16': {cuda_bf16_missing(self.device)}")
        if autocast == "bf16":
            warn_if_slow_bf16(self.device)
        self.autocast = autocast
        self.scaler = torch.amp.GradScaler(self.device.type) if autocast == "fp16" else None
        keep_freed_memory()
        # float32 matmuls on CUDA run in TF32 inside the model's calls (the process's setting is left alone)
        self.tf32 = self.device.type == "cuda" and dtype == "float32"
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self.generator = torch.Generator().manual_seed(seed)   # dropout's stream (see device.dropout_stream)
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

    # ---- precision and speed ----

    @property
    def precision(self) -> str:
        """What the matrix products run in: 'bf16' or 'fp16' (autocast), 'tf32' (float32 on CUDA), 'fp32',
        'fp64'."""
        if self.autocast:
            return self.autocast
        return "tf32" if self.tf32 else {"float32": "fp32", "float64": "fp64"}[self.dtype.name]

    @property
    def peak_flops(self) -> float | None:
        """The GPU's dense peak FLOP/s at self.precision (npgpt.peak_flops); None on the CPU or a GPU
        not in its table. fp16's tensor-core peak is bf16's on every GPU that has both; the table
        has no figure for GPUs without bf16."""
        precision = "bf16" if self.precision == "fp16" else self.precision
        return None if self.device_name is None else peak_flops(self.device_name, precision)

    @property
    def synchronous(self) -> bool:
        return self.device.type != "cuda"

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def _compute(self):
        """What every forward pass runs under: bf16 autocast if asked for, TF32 for float32 on CUDA,
        and dropout (in training mode) drawn from self.generator; rank r adds r to its seeds."""
        dropout = self.training and self.cfg.drop_rate > 0 and self._dropout_masks is None
        rank = 0 if self.ranks is None else self.ranks.rank
        with self.autocast_context(), tf32_matmuls(self.tf32), \
                dropout_stream(self.generator, rank, self.device, dropout):
            yield

    # ---- the interface shared with the NumPy backend ----

    def _ids(self, ids, what="inputs") -> torch.Tensor:
        ids = check_token_ids(ids, self.cfg.vocab_size, what, self.cfg.context_length)
        return to_device(torch.from_numpy(ids), self.device)

    def autocast_context(self):
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES.get(self.autocast, torch.bfloat16),
                              enabled=self.autocast is not None)

    def logits(self, idx) -> np.ndarray:
        with torch.no_grad(), self._compute():
            logits = self.module(self._ids(idx))                       # (B, T, V)
        return to_numpy(logits.to(TORCH_DTYPES[self.dtype.name]))

    def loss(self, inputs, targets) -> float:
        inputs, targets = self._ids(inputs), self._ids(targets, "targets")
        with torch.no_grad(), self._compute():
            if len(inputs) and self.grad_accum == 1:
                loss = self.module(inputs, targets)
            elif len(inputs):   # in micro-batches, as training runs them: no more memory than a step holds
                pieces = zip(inputs.chunk(self.grad_accum), targets.chunk(self.grad_accum))
                loss = sum(self.module(x, y) * len(x) for x, y in pieces) / len(inputs)
            else:   # a rank's padding batch in DDP evaluation: no forward (flash SDPA refused batch 0)
                loss = torch.full((), math.nan, device=self.device)
        return float(self._mean(loss, len(inputs)))

    @torch.no_grad()
    def masked_loss_sums(self, tokens, mask) -> np.ndarray:
        """Base.masked_loss_sums on the device: the (R, L-1, V) logits and their log-softmax stay
        there, and only the R sums come back (HellaSwag's scoring)."""
        ids = self._ids(tokens[:, :-1])
        with self._compute():
            logits = self.module(ids)                                       # (R, L-1, V)
        targets = torch.from_numpy(np.ascontiguousarray(tokens[:, 1:])).to(self.device)
        rows, cols = torch.from_numpy(np.ascontiguousarray(mask[:, 1:])).to(self.device).nonzero(as_tuple=True)
        wide = torch.float32 if self.device.type == "mps" else torch.float64   # MPS has no float64
        picked = logits[rows, cols].to(wide)                               # (n, V): scored positions only
        losses = torch.logsumexp(picked, dim=1) - picked.gather(1, targets[rows, cols][:, None]).squeeze(1)
        return to_numpy(torch.zeros(len(tokens), dtype=wide, device=self.device).index_add_(0, rows, losses))

    def _mean(self, loss: torch.Tensor, n: int) -> torch.Tensor:
        """This batch's mean loss over its n windows; under torchrun, the mean over every rank's
        windows. A 0-dim tensor on the device: nothing here waits for the GPU."""
        return loss if self.ranks is None else self.ranks.mean(loss, n)

    def _forward_backward(self, inputs, targets) -> torch.Tensor:
        """The batch's mean loss and its gradients. With grad_accum = k the batch runs as k equal
        micro-batches, each loss scaled by 1/k, so the gradients sum to the whole batch's; under DDP
        only the last backward exchanges gradients (no_sync). Under fp16 the gradients are left
        multiplied by the GradScaler's scale (train_step unscales them)."""
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
                with self._compute():
                    loss = self._step_module(x, y) / k
                with tf32_matmuls(self.tf32):
                    (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            total = total + loss.detach()
        return self._mean(total, len(inputs))

    def forward_backward(self, inputs, targets) -> float:
        """Mean cross-entropy of one batch; leaves its gradients in the module (averaged over ranks
        under DDP; under fp16, unscaled)."""
        loss = self._forward_backward(inputs, targets)
        if self.scaler is not None:
            with torch.no_grad():
                inv = 1.0 / self.scaler.get_scale()
                for p in self.module.parameters():
                    if p.grad is not None:
                        p.grad.mul_(inv)
        return float(loss)

    def train_step(self, inputs, targets, optimizer, clip_norm: float | None = None, sync: bool = True,
                   apply_update=None):
        """Base.train_step; with sync=False, one that never waits for the GPU: the loss stays a 0-dim
        tensor on the device, clipping stays there, and a non-finite loss skips the update inside
        fused AdamW's kernel (found_inf, as torch's GradScaler uses it). The optimizer's step_count
        still counts a skipped step; npgpt.base.loss_value raises when the loss is read.
        apply_update (the spike guard) needs the loss and norm on the host: the step then waits."""
        if self.scaler is not None:
            return self._fp16_step(inputs, targets, optimizer, clip_norm, apply_update)
        if sync or apply_update is not None or not getattr(optimizer, "fused", False):
            return super().train_step(inputs, targets, optimizer, clip_norm, apply_update=apply_update)
        self.last_applied = True
        loss = self._forward_backward(inputs, targets)           # averaged over the ranks: all agree
        self.last_grad_norm = self._grad_norm() if clip_norm is None else \
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip_norm)       # a device tensor
        optimizer.step(found_inf=(~torch.isfinite(loss)).float())
        return loss

    def _fp16_step(self, inputs, targets, optimizer, clip_norm, apply_update) -> float:
        """train_step under the GradScaler: the scaled gradients are unscaled before clipping (so
        clip_norm and the norm logged are the true ones); a step whose gradients overflowed
        float16 (a non-finite norm) is skipped and the scale halved, as GradScaler.step does; the
        scale grows again after growth_interval clean steps. Waits for the device (the loss and
        the overflow are read on the host)."""
        loss = float(self._forward_backward(inputs, targets))
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss}; the optimizer step was skipped")
        self.scaler.unscale_(optimizer.opt)
        norm = self.grad_norm() if clip_norm is None else self.clip_grad_norm(clip_norm)
        self.last_grad_norm = norm
        wanted = apply_update is None or apply_update(loss, norm)
        self.last_applied = wanted and math.isfinite(norm)           # an overflow: GradScaler's skip
        if self.last_applied:
            optimizer.step()
        self.scaler.update()
        return loss

    def loss_and_grads(self, inputs, targets):
        loss = self.forward_backward(inputs, targets)
        return loss, {name: to_numpy(p.grad) for name, p in self.module.named_parameters()}

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before."""
        return float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))

    def _grad_norm(self) -> torch.Tensor:
        norms = [torch.linalg.vector_norm(p.grad) for p in self.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms))           # as clip_grad_norm_ sums them

    def grad_norm(self) -> float:
        """The global L2 norm of all gradients (clip_grad_norm's, without the clipping)."""
        return float(self._grad_norm())

    def rng_state(self) -> dict:
        """The dropout generator's state, JSON-serialisable, for checkpoints (under DDP every rank's
        generator is in the same state, so rank 0's checkpoint resumes them all)."""
        return {"cpu": base64.b64encode(self.generator.get_state().numpy().tobytes()).decode()}

    def set_rng_state(self, state: dict) -> None:
        self.generator.set_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["cpu"]), np.uint8).copy()))

    # ---- generation: what npgpt.sampling's loop asks of a backend ----

    def new_kv_cache(self, batch_size: int, capacity: int) -> KVCache:
        dtype = AUTOCAST_DTYPES.get(self.autocast, self.module.wte.dtype)       # k, v as computed
        return KVCache(self.cfg, batch_size, capacity, lambda shape: torch.zeros(shape, dtype=dtype,
                                                                                 device=self.device))

    @torch.no_grad()
    def next_logits(self, ids, cache: KVCache | None) -> torch.Tensor:
        """ids (B, Tn) -> logits of the last position (B, V), on the device; with a cache, ids
        continue its positions."""
        with self._compute():
            return self.module(torch.from_numpy(ids).to(self.device), cache=cache, last=True)[:, -1]

    def sampler(self, seed):
        from .sampling import sampler
        return sampler(seed, self.device)
