"""AdamW by hand, with torch.optim.AdamW's semantics, over the model's flat parameter buffer.

Parameters, gradients and both moments are each one flat array, so a step is a few in-place
passes over whole buffers instead of a Python loop over ~150 tensors. The buffers are walked
in chunks small enough that all 13 passes over a chunk stay in the CPU's caches (main memory is
read and written once a step, not once a pass), large enough that Python's ~1 us a NumPy call is
small; the chunks are shared out over every core (threads.parallel_map).
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from ..params import check_params, decays
from .reference_optim import adamw_update as reference_adamw_update
from .model import flat_views
from .threads import parallel_map

CHUNK_BYTES = 1 << 20  # per buffer: 5 MiB a chunk (p, g, m, v, scratch), in cache. The fastest of
                       # 64 KiB to 4 MiB on the 124M model: 185 ms a step, 218 at 256 KiB (2 cores)


def adamw_update(p, g, m, v, tmp, lr, b1, b2, eps, t, decay_factor, decay_ranges):
    """One AdamW step on matching slices of the flat buffers, in place: torch's update,
    p *= 1 - lr * wd (on decay_ranges);  m += (1 - b1) (g - m);  v = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    with the last line's two bias corrections moved together, which saves a pass:
    p -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps sqrt(1 - b2^t))
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
    root_bc2 = math.sqrt(1.0 - b2 ** t)
    np.sqrt(v, out=tmp)
    tmp += dt(eps * root_bc2)
    np.divide(m, tmp, out=tmp)
    tmp *= dt(lr * root_bc2 / (1.0 - b1 ** t))
    p -= tmp


class AdamW:
    """torch.optim.AdamW's update (decoupled weight decay, bias correction), by hand.

    decay names the parameters weight decay applies to (params.decays): "all", as the book's
    torch.optim.AdamW(model.parameters(), weight_decay=0.1) does, "matrices" (biases and LayerNorm
    exempt) or "none". On a model running the reference kernels, step() is reference_optim.adamw_update
    on each tensor.
    """

    def __init__(self, model, lr=5e-4, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8, decay="all"):
        self.model = model
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, tuple(betas), eps
        self.step_count = 0
        self.exp_avg = np.zeros(model.flat_params.shape, model.flat_params.dtype)   # calloc: lazy pages
        self.exp_avg_sq = np.zeros(model.flat_params.shape, model.flat_params.dtype)
        self.set_decay(decay)

    def set_decay(self, decay: str) -> None:
        """Find, for every chunk, the ranges inside it whose parameters get weight decay."""
        self.decay = decay
        decayed, offset = [], 0
        for name, shape in self.model.shapes.items():
            size = math.prod(shape)
            if decayed and decayed[-1][1] == offset and decays(name, decay):
                decayed[-1] = (decayed[-1][0], offset + size)      # one range for neighbours
            elif decays(name, decay):
                decayed.append((offset, offset + size))
            offset += size
        self._chunks = []
        chunk = CHUNK_BYTES // self.exp_avg.itemsize
        first = 0                                           # the first range not before this chunk
        for start in range(0, offset, chunk):
            stop = min(start + chunk, offset)
            while first < len(decayed) and decayed[first][1] <= start:
                first += 1
            ranges = [(max(a, start) - start, min(b, stop) - start)
                      for a, b in itertools.takewhile(lambda r: r[0] < stop, decayed[first:])]
            self._chunks.append((start, stop, ranges))

    def step(self):
        self.step_count += 1
        if self.model.kernels == "reference":
            return self.reference_step()
        b1, b2 = self.betas
        bufs = (self.model.flat_params, self.model.flat_grads, self.exp_avg, self.exp_avg_sq)
        hyper = (self.lr, b1, b2, self.eps, self.step_count, 1.0 - self.lr * self.weight_decay)

        def run(chunk):
            start, stop, ranges = chunk
            p, g, m, v = (b[start:stop] for b in bufs)
            adamw_update(p, g, m, v, np.empty_like(p), *hyper, ranges)     # scratch: L2-sized

        parallel_map(run, self._chunks)

    def reference_step(self):
        """The textbook update, tensor by tensor (reference_optim.adamw_update), written into the buffers."""
        model, m_views, v_views = self.model, flat_views(self.exp_avg, self.model.shapes), \
            flat_views(self.exp_avg_sq, self.model.shapes)
        for name, p in model.p.items():
            wd = self.weight_decay if decays(name, self.decay) else 0.0
            p[...], m_views[name][...], v_views[name][...] = reference_adamw_update(
                p, model.g[name], m_views[name], v_views[name], self.step_count, self.lr, self.betas,
                self.eps, wd)

    def state(self) -> dict:
        """Hyperparameters, step and the moments by parameter name (copies)."""
        state = self.state_views()
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = {n: a.copy() for n, a in state[key].items()}
        return state

    def state_views(self) -> dict:
        """state() with the moments as views into the flat buffers, not copies: what a checkpoint
        writes, without a second copy of both moments (the next step changes them)."""
        return {"step": self.step_count, "lr": self.lr, "betas": self.betas, "eps": self.eps,
                "weight_decay": self.weight_decay, "decay": self.decay,
                "exp_avg": flat_views(self.exp_avg, self.model.shapes),
                "exp_avg_sq": flat_views(self.exp_avg_sq, self.model.shapes)}

    def load_state(self, state: dict) -> None:
        for key in ("exp_avg", "exp_avg_sq"):
            check_params(state[key], self.model.shapes)
        self.step_count = int(state["step"])
        self.lr, self.eps, self.weight_decay = float(state["lr"]), float(state["eps"]), float(state["weight_decay"])
        self.betas = tuple(float(b) for b in state["betas"])
        self.set_decay(state.get("decay", "all"))
        for key, flat in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            for name, view in flat_views(flat, self.model.shapes).items():
                view[...] = state[key][name]
