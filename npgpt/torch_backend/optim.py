"""AdamW for the torch backend: torch.optim.AdamW (fused where the device supports it) with the
NumPy backend's parameter groups, behind the same surface as npgpt.numpy_backend.optim.AdamW.

state() / load_state() speak the NumPy optimizer's format (moments as NumPy arrays by parameter
name), so optimizer state moves between the backends and through checkpoints unchanged.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ..params import check_params, decays
from .model import to_numpy


@functools.lru_cache(maxsize=None)
def fused_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch has a fused AdamW kernel for this device and dtype: try one step on a scalar."""
    p = torch.zeros(1, dtype=dtype, device=device_type, requires_grad=True)
    p.grad = torch.ones_like(p)
    try:
        torch.optim.AdamW([p], fused=True).step()
    except RuntimeError:
        return False
    return True


def make_adamw(model, lr=5e-4, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8, decay="all"):
    return TorchAdamW(model, lr, weight_decay, betas, eps, decay)


class _GroupSetting:
    """A hyperparameter of torch's optimizer as an attribute: read from its first parameter group,
    set (through cast) on every group."""

    def __init__(self, cast):
        self.cast = cast

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.opt.param_groups[0][self.name]

    def __set__(self, obj, value) -> None:
        for group in obj.opt.param_groups:
            group[self.name] = self.cast(value)


class TorchAdamW:
    """torch.optim.AdamW with settable hyperparameters (.lr, .betas, .eps, .weight_decay) that
    apply to every parameter group, and NumPy-format state()/load_state()."""

    def __init__(self, model, lr=5e-4, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8, decay="all"):
        self.model = model
        self.step_count = 0
        self._build(lr, weight_decay, betas, eps, decay)

    def _build(self, lr, weight_decay, betas, eps, decay):
        """The parameter groups of the NumPy AdamW (params.decays): the decayed parameters, then the
        exempt ones at weight decay 0, leaving out a group that would be empty."""
        named = list(self.model.module.named_parameters())
        decayed = [p for n, p in named if decays(n, decay)]
        exempt = [p for n, p in named if not decays(n, decay)]
        groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((decayed, float(weight_decay)), (exempt, 0.0))
                  if ps]
        self.decay, self._weight_decay, self._decayed_group = decay, float(weight_decay), bool(decayed)
        name_of = {id(p): n for n, p in named}
        self._names = [name_of[id(p)] for g in groups for p in g["params"]]   # state_dict's order
        p0 = named[0][1]
        self.fused = fused_supported(p0.device.type, p0.dtype)
        self.opt = torch.optim.AdamW(groups, lr=float(lr), betas=tuple(float(b) for b in betas),
                                     eps=float(eps), **({"fused": True} if self.fused else {"foreach": True}))

    def step(self, found_inf: torch.Tensor | None = None) -> None:
        """One AdamW step. found_inf (fused kernels only): a 0-dim float tensor on the device, and
        where it is nonzero the kernel leaves parameters and moments untouched, without the host
        having to look (torch's GradScaler passes its overflow flag the same way)."""
        if found_inf is None:
            self.opt.step()
        else:
            self.opt.found_inf = found_inf
            try:
                self.opt.step()
            finally:
                del self.opt.found_inf
        self.step_count += 1

    # ---- hyperparameters, set on every group ----

    lr = _GroupSetting(float)
    betas = _GroupSetting(lambda value: tuple(float(b) for b in value))
    eps = _GroupSetting(float)

    @property
    def weight_decay(self) -> float:
        return self._weight_decay

    @weight_decay.setter
    def weight_decay(self, value: float) -> None:
        self._weight_decay = float(value)
        if self._decayed_group:                                          # the first; the exempt one keeps 0
            self.opt.param_groups[0]["weight_decay"] = self._weight_decay

    # ---- state in the NumPy optimizer's format ----

    def state(self) -> dict:
        """Hyperparameters, step and the moments by parameter name (NumPy copies; zeros before
        the first step, when torch has no state yet)."""
        moments = {"exp_avg": {}, "exp_avg_sq": {}}
        for name, p in self.model.module.named_parameters():
            s = self.opt.state.get(p)
            for key, by_name in moments.items():
                by_name[name] = to_numpy(s[key]) if s else np.zeros(p.shape, self.model.dtype)
        scaler = getattr(self.model, "scaler", None)   # fp16's GradScaler: resumed with the moments
        return {"step": self.step_count, "lr": self.lr, "betas": self.betas, "eps": self.eps,
                "weight_decay": self.weight_decay, "decay": self.decay, **moments,
                **({"grad_scaler": scaler.state_dict()} if scaler is not None else {})}

    def load_state(self, state: dict) -> None:
        """Take a state() dict of either backend: rebuild the groups with its hyperparameters and
        give torch its per-parameter state through load_state_dict, which moves each tensor to
        its parameter's device and dtype (and the step counter where fused kernels want it)."""
        for key in ("exp_avg", "exp_avg_sq"):
            check_params(state[key], self.model.shapes)
        self._build(state["lr"], state["weight_decay"], state["betas"], state["eps"], state.get("decay", "all"))
        step = int(state["step"])
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))
        saved = self.opt.state_dict()
        saved["state"] = {i: {"step": torch.tensor(float(step)),
                              "exp_avg": as_tensor(state["exp_avg"][name]),
                              "exp_avg_sq": as_tensor(state["exp_avg_sq"][name])}
                          for i, name in enumerate(self._names)}
        self.opt.load_state_dict(saved)
        self.step_count = step
        if getattr(self.model, "scaler", None) is not None and state.get("grad_scaler"):     # else a new scaler starts afresh
            self.model.scaler.load_state_dict(state["grad_scaler"])
