"""AdamW by hand, with torch.optim.AdamW's semantics, over the model's flat parameter buffer.

Because parameters, gradients and both moments are each one flat array, a step is a handful
of whole-buffer, in-place passes instead of a Python loop over ~150 tensors.
"""
from __future__ import annotations

import math

import numpy as np

from ..params import check_params
from .model import flat_views


def no_decay(name: str) -> bool:
    """Biases, LayerNorm parameters and the embeddings: exempt when decay_all=False."""
    return name.endswith(".bias") or ".ln_" in name or name.startswith("ln_f") or name in ("wte", "wpe")


class AdamW:
    """m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p = p - lr * wd * p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

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
        """Find the contiguous runs of the flat buffer that get weight decay."""
        self.decay_all = decay_all
        self._decay_slices, offset = [], 0
        for name, shape in self.model.shapes.items():
            size = math.prod(shape)
            if decay_all or not no_decay(name):
                if self._decay_slices and self._decay_slices[-1].stop == offset:
                    self._decay_slices[-1] = slice(self._decay_slices[-1].start, offset + size)
                else:
                    self._decay_slices.append(slice(offset, offset + size))
            offset += size

    def step(self):
        p, g, m, v, tmp = self.model.flat_params, self.model.flat_grads, self.exp_avg, self.exp_avg_sq, self._scratch
        b1, b2 = self.betas
        dt = p.dtype.type
        self.step_count += 1
        t = self.step_count
        if self.weight_decay:
            for s in self._decay_slices:
                p[s] *= dt(1.0 - self.lr * self.weight_decay)
        # m += (1 - b1) * (g - m)   (torch's lerp)
        np.subtract(g, m, out=tmp)
        tmp *= dt(1.0 - b1)
        m += tmp
        # v = b2 * v + (1 - b2) * g * g
        v *= dt(b2)
        np.multiply(g, g, out=tmp)
        tmp *= dt(1.0 - b2)
        v += tmp
        # p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
        step_size = self.lr / (1.0 - b1 ** t)
        np.sqrt(v, out=tmp)
        tmp *= dt(1.0 / math.sqrt(1.0 - b2 ** t))
        tmp += dt(self.eps)
        np.divide(m, tmp, out=tmp)
        tmp *= dt(step_size)
        p -= tmp

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
