"""AdamW by hand, with torch.optim.AdamW's semantics, over the model's flat parameter buffer.

Parameters, gradients and both moments are each one flat array, so a step is a few in-place
passes over whole buffers instead of a Python loop over ~150 tensors. The buffers are walked
in chunks small enough that all passes over a chunk stay in the CPU cache (memory is read once,
not once per pass), and the chunks are shared out over a thread pool: NumPy releases the GIL
inside its arithmetic, so both cores work.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..params import check_params
from .model import flat_views

CHUNK = 1 << 18        # elements a chunk: the five float32 slices (5 MiB) stay in the cache
_POOL = ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, 8), thread_name_prefix="npgpt-adamw")


def no_decay(name: str) -> bool:
    """Biases, LayerNorm parameters and the embeddings: exempt when decay_all=False."""
    return name.endswith(".bias") or ".ln_" in name or name.startswith("ln_f") or name in ("wte", "wpe")


def adamw_update(p, g, m, v, tmp, lr, b1, b2, eps, t, decay_factor, decay_ranges):
    """One AdamW step on matching slices of the flat buffers, in place, in torch's order of operations.

    p *= 1 - lr * wd (on decay_ranges);  m += (1 - b1) (g - m);  v = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """
    dt = p.dtype.type
    for start, stop in decay_ranges:
        p[start:stop] *= dt(decay_factor)
    np.subtract(g, m, out=tmp)          # torch's lerp: m + (1 - b1) * (g - m)
    tmp *= dt(1.0 - b1)
    m += tmp
    v *= dt(b2)
    np.multiply(g, g, out=tmp)
    tmp *= dt(1.0 - b2)
    v += tmp
    np.sqrt(v, out=tmp)
    tmp *= dt(1.0 / math.sqrt(1.0 - b2 ** t))
    tmp += dt(eps)
    np.divide(m, tmp, out=tmp)
    tmp *= dt(lr / (1.0 - b1 ** t))
    p -= tmp


class AdamW:
    """torch.optim.AdamW's update (decoupled weight decay, bias correction), by hand.

    decay_all=True decays every parameter, as the book's torch.optim.AdamW(model.parameters(),
    weight_decay=0.1) does; decay_all=False exempts biases, LayerNorm and embeddings.
    """

    def __init__(self, model, lr=5e-4, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8, decay_all=True):
        self.model = model
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, tuple(betas), eps
        self.step_count = 0
        self.exp_avg = np.zeros_like(model.flat_params)
        self.exp_avg_sq = np.zeros_like(model.flat_params)
        self._scratch = np.empty_like(model.flat_params)
        self.set_decay_all(decay_all)

    def set_decay_all(self, decay_all: bool) -> None:
        """Find, for every chunk, the ranges inside it whose parameters get weight decay."""
        self.decay_all = decay_all
        decayed, offset = [], 0
        for name, shape in self.model.shapes.items():
            size = math.prod(shape)
            if decay_all or not no_decay(name):
                decayed.append((offset, offset + size))
            offset += size
        self._chunks = []
        for start in range(0, offset, CHUNK):
            stop = min(start + CHUNK, offset)
            ranges = [(max(a, start) - start, min(b, stop) - start) for a, b in decayed if a < stop and b > start]
            self._chunks.append((start, stop, ranges))

    def step(self):
        self.step_count += 1
        b1, b2 = self.betas
        bufs = (self.model.flat_params, self.model.flat_grads, self.exp_avg, self.exp_avg_sq, self._scratch)
        hyper = (self.lr, b1, b2, self.eps, self.step_count, 1.0 - self.lr * self.weight_decay)

        def run(chunk):
            start, stop, ranges = chunk
            adamw_update(*(b[start:stop] for b in bufs), *hyper, ranges)

        list(_POOL.map(run, self._chunks))

    def state(self) -> dict:
        """Hyperparameters, step and the moments by parameter name (copies)."""
        views = lambda flat: {n: a.copy() for n, a in flat_views(flat, self.model.shapes).items()}
        return {"step": self.step_count, "lr": self.lr, "betas": self.betas, "eps": self.eps,
                "weight_decay": self.weight_decay, "decay_all": self.decay_all,
                "exp_avg": views(self.exp_avg), "exp_avg_sq": views(self.exp_avg_sq)}

    def load_state(self, state: dict) -> None:
        for key in ("exp_avg", "exp_avg_sq"):
            check_params(state[key], self.model.shapes)
        self.step_count = int(state["step"])
        self.lr, self.eps, self.weight_decay = float(state["lr"]), float(state["eps"]), float(state["weight_decay"])
        self.betas = tuple(float(b) for b in state["betas"])
        self.set_decay_all(bool(state.get("decay_all", True)))
        for key, flat in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            for name, view in flat_views(flat, self.model.shapes).items():
                view[...] = state[key][name]
