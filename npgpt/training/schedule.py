"""The learning-rate schedule: linear warmup, then cosine decay to a floor (appendix D, and the GPT-2
recipe nanoGPT and llm.c run). A run's schedule is a Schedule (npgpt/run_state.py), saved with it."""
from __future__ import annotations

import math

from ..run_state import Schedule


def warmup_cosine_lr(step, peak_lr, total_steps, warmup_steps=0, initial_lr=None, min_lr=None, cosine=True):
    """The learning rate at global step `step` (0-based).

    Warmup (step < warmup_steps): with initial_lr=None, nanoGPT's peak_lr·(step+1)/(warmup_steps+1),
    which starts near zero and stays below the peak; with a number, appendix D's line from
    initial_lr (the book's train_model: 3e-5) to the peak, which goes down when initial_lr is the
    larger. After it: peak_lr (cosine=False), or half a cosine from peak_lr down to min_lr at
    total_steps, and min_lr from there on. min_lr=None is peak_lr / 10, as nanoGPT's (the book's
    train_model: 1e-6)."""
    if step < warmup_steps:
        if initial_lr is None:
            return peak_lr * (step + 1) / (warmup_steps + 1)
        return initial_lr + step * (peak_lr - initial_lr) / warmup_steps
    if not cosine:
        return peak_lr
    min_lr = peak_lr / 10 if min_lr is None else min_lr
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def scheduled_lr(schedule: Schedule, step: int) -> float:
    """The learning rate the run's schedule gives step `step`."""
    return warmup_cosine_lr(step, schedule.peak_lr, schedule.decay_steps, schedule.warmup_steps,
                            schedule.initial_lr, schedule.min_lr, schedule.cosine)
