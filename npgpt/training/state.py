"""What a training run carries across a restart (saved in the checkpoint's train_state group)."""
from __future__ import annotations

from dataclasses import dataclass, field


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the parameters were not updated with it."""


@dataclass
class TrainState:
    """Everything the loop needs to carry on after a restart."""
    epoch: int = 0               # epoch in progress (0-based)
    global_step: int = -1        # last completed optimizer step (the book starts at -1)
    tokens_seen: int = 0
    train_losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    track_tokens_seen: list = field(default_factory=list)
    track_steps: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    peak_lr: float | None = None # the schedule's peak (the optimizer's lr when the run started)
    step_seconds: float = 0.0    # time inside train_step in this process (not saved: a speed figure)
