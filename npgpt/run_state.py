"""What a training run carries across a restart: its progress (TrainState) and its learning-rate
schedule (Schedule), both saved in the checkpoint's train_state group. A bottom module: the loop
(training/) and the checkpoint (weights/) import it, and it imports neither."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the parameters were not updated with it."""


KINDS = ("constant", "cosine", "linear", "wsd")     # llm.c's -k choices


@dataclass(frozen=True)
class Schedule:
    """The learning rate of every step, fixed when a run starts and saved with it, so a resumed run
    follows the same curve whatever its new length (training/schedule.py computes it). After the
    warmup, kind says what follows: constant (peak_lr), cosine or linear from peak_lr down to
    min_lr at step decay_steps, or wsd (warmup-stable-decay: peak_lr, then over the last
    decay_fraction of decay_steps down to min_lr as 1 - sqrt, llm.c's). min_lr holds after
    decay_steps."""
    peak_lr: float                    # the lr after warmup (and the whole run's, without warmup or decay)
    warmup_steps: int = 0             # steps 0 .. warmup_steps - 1 ramp up linearly
    initial_lr: float | None = None   # warmup's start: None for nanoGPT's peak·(s+1)/(warmup+1), else
                                      # appendix D's line from initial_lr
    cosine: bool = False              # the name from before kind: True is kind="cosine" (files, callers)
    decay_steps: int | None = None    # cosine, linear, wsd: the step at which the lr reaches min_lr
    min_lr: float | None = None       # cosine, linear, wsd: the floor (llm.c's -q: min_lr / peak_lr)
    kind: str | None = None           # one of KINDS; None: "cosine" if cosine else "constant"
    decay_fraction: float | None = None   # wsd: the last fraction of decay_steps that decays (llm.c: 0.2)

    def __post_init__(self):
        def number(key, value, ok=math.isfinite, expected="a finite number >= 0"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and ok(value)):
                raise ValueError(f"Schedule.{key} must be {expected}, got {value!r}")
        number("peak_lr", self.peak_lr)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"Schedule.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.initial_lr is not None:
            number("initial_lr", self.initial_lr)
        if not isinstance(self.cosine, bool):
            raise ValueError(f"Schedule.cosine must be True or False, got {self.cosine!r}")
        kind = self.kind if self.kind is not None else "cosine" if self.cosine else "constant"
        if kind not in KINDS:
            raise ValueError(f"Schedule.kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if self.cosine and kind != "cosine":
            raise ValueError(f"Schedule.cosine=True contradicts kind={kind!r}")
        object.__setattr__(self, "kind", kind)                  # frozen: the two names agree from here on
        object.__setattr__(self, "cosine", kind == "cosine")
        if kind != "constant":
            if isinstance(self.decay_steps, bool) or not isinstance(self.decay_steps, int) or self.decay_steps < 1:
                raise ValueError(f"Schedule.decay_steps must be a positive integer with kind={kind!r}, got "
                                 f"{self.decay_steps!r}")
            number("min_lr", self.min_lr, lambda v: v <= self.peak_lr, f"a number in [0, peak_lr {self.peak_lr}]")
        if kind == "wsd":
            number("decay_fraction", self.decay_fraction, lambda v: 0 < v <= 1, "a number in (0, 1]")
            if self.decay_start < self.warmup_steps:
                raise ValueError(f"Schedule: the wsd decay would start at step {self.decay_start}, inside the "
                                 f"warmup of {self.warmup_steps} steps (decay_fraction {self.decay_fraction} of "
                                 f"decay_steps {self.decay_steps})")
        elif self.decay_fraction is not None:
            raise ValueError(f"Schedule.decay_fraction is wsd's; kind={kind!r} has none")

    @property
    def decay_start(self) -> int:
        """wsd: the first step of the decay, decay_steps - round(decay_fraction * decay_steps)."""
        return self.decay_steps - round(self.decay_fraction * self.decay_steps)

    @property
    def scheduled(self) -> bool:
        """Whether the lr changes from step to step (else the loop leaves the optimizer's lr alone)."""
        return self.warmup_steps > 0 or self.kind != "constant"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        """A saved schedule: this version's, or one from before kind (cosine: true or false)."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown Schedule fields {sorted(unknown)}")
        return cls(**d)


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
    hellaswag: list = field(default_factory=list)   # {"step", "n", "acc", "acc_norm"} of each scored evaluation
    schedule: Schedule | None = None   # set when the run starts (training/loop.py), followed after a resume
    guard_losses: list = field(default_factory=list)   # the spike guard's windows (training/guard.py):
    guard_norms: list = field(default_factory=list)    # the last 128 losses and gradient norms
    skipped_steps: list = field(default_factory=list)  # the steps whose update the guard (or fp16) skipped
    step_seconds: float = 0.0    # time inside train_step in this process (not saved: a speed figure)
