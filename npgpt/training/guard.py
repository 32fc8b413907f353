"""The spike guard: llm.c's outlier detector. A loss or gradient-norm spike (a bad batch, an lr too
high for a moment) can throw a week of training off in one update; the guard skips that update.

Each step's loss and gradient norm (before clipping) go into a window of the last WINDOW (128)
values of each. Once a window is full, a new value's z-score is taken against the window as it
stands before the value joins it: z = (x - mean) / std, std the population one (over the WINDOW
values). The update is skipped when the loss's z passes loss_z or the norm's passes grad_z (each
None: not checked). As llm.c's, every value joins its window, a skipped step's too, so a lasting
change of level is soon the new normal instead of skipping every later step.

The windows are plain lists (window()), saved with the run's TrainState, so a resumed run makes
the same decisions as one that never stopped.
"""
from __future__ import annotations

import math
from collections import deque

WINDOW = 128        # llm.c's OUTLIER_DETECTOR_WINDOW_SIZE


def z_score(window, value: float) -> float:
    """value's z-score against the full window (NaN until it holds WINDOW values, or when its
    values are all equal)."""
    if len(window) < WINDOW:
        return math.nan
    mean = math.fsum(window) / len(window)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in window) / len(window))
    return (value - mean) / std if std > 0 else math.nan


class SpikeGuard:
    """Decides, step by step, whether an update is applied (see the module docstring).

    loss_z, grad_z: the thresholds (positive numbers, or None for no check on that value).
    losses, norms: the windows to start from (a resumed run's TrainState.guard_losses/_norms)."""

    def __init__(self, loss_z: float | None = None, grad_z: float | None = None, losses=(), norms=()):
        for name, z in (("loss_z", loss_z), ("grad_z", grad_z)):
            if z is not None and (isinstance(z, bool) or not isinstance(z, (int, float)) or not 0 < z < math.inf):
                raise ValueError(f"SpikeGuard {name} must be a positive number or None, got {z!r}")
        self.loss_z, self.grad_z = loss_z, grad_z
        self.losses = deque((float(v) for v in losses), maxlen=WINDOW)
        self.norms = deque((float(v) for v in norms), maxlen=WINDOW)

    @property
    def active(self) -> bool:
        return self.loss_z is not None or self.grad_z is not None

    def observe(self, loss: float, norm: float | None) -> tuple[float, float]:
        """Add one step's loss and gradient norm to the windows; -> their z-scores (NaN while a
        window fills). A norm of None (not measured) or not finite (an fp16 overflow step, which
        the GradScaler skips itself) leaves the norm window as it is."""
        z_loss = z_score(self.losses, loss)
        self.losses.append(float(loss))
        z_norm = math.nan
        if norm is not None and math.isfinite(norm):
            z_norm = z_score(self.norms, norm)
            self.norms.append(float(norm))
        return z_loss, z_norm

    def skip(self, loss: float, norm: float | None) -> str | None:
        """observe(loss, norm), then why the update is to be skipped ("loss z 7.3 > 6"), or None."""
        z_loss, z_norm = self.observe(loss, norm)
        if self.loss_z is not None and z_loss > self.loss_z:            # NaN compares False: a filling window
            return f"loss z {z_loss:.1f} > {self.loss_z:g}"
        if self.grad_z is not None and z_norm > self.grad_z:
            return f"grad norm z {z_norm:.1f} > {self.grad_z:g}"
        return None

    def window(self) -> tuple[list, list]:
        """(losses, norms): the windows as plain lists, oldest first, for the checkpoint."""
        return list(self.losses), list(self.norms)
