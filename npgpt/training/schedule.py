"""The learning-rate schedules: a linear warmup, then constant, cosine, linear or warmup-stable-decay
(llm.c's -k constant|cosine|linear|wsd, its final fraction -q being min_lr / peak_lr). Appendix D
and the GPT-2 recipe nanoGPT and llm.c run are warmup + cosine. A run's schedule is a Schedule
(npgpt/run_state.py), saved with it; scheduled_lr gives the lr of each step from it.
"""
from __future__ import annotations

import math

from ..run_state import Schedule


def warmup_lr(step, peak_lr, warmup_steps, initial_lr=None):
    """The lr of a warmup step (step < warmup_steps). initial_lr=None: nanoGPT's
    peak_lr·(step+1)/(warmup_steps+1), which starts near zero and stays below the peak; a number:
    appendix D's line from initial_lr (the book's train_model: 3e-5) to the peak, which goes down
    when initial_lr is the larger."""
    if initial_lr is None:
        return peak_lr * (step + 1) / (warmup_steps + 1)
    return initial_lr + step * (peak_lr - initial_lr) / warmup_steps


def warmup_cosine_lr(step, peak_lr, total_steps, warmup_steps=0, initial_lr=None, min_lr=None, cosine=True):
    """The learning rate at global step `step` (0-based): warmup (warmup_lr), then peak_lr
    (cosine=False), or half a cosine from peak_lr down to min_lr at total_steps, and min_lr from
    there on. min_lr=None is peak_lr / 10, as nanoGPT's (the book's train_model: 1e-6)."""
    if step < warmup_steps:
        return warmup_lr(step, peak_lr, warmup_steps, initial_lr)
    if not cosine:
        return peak_lr
    min_lr = peak_lr / 10 if min_lr is None else min_lr
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def scheduled_lr(schedule: Schedule, step: int) -> float:
    """The learning rate the run's schedule gives step `step` (0-based).

    After the warmup: constant holds peak_lr; cosine and linear go from peak_lr at the warmup's
    end to min_lr at decay_steps (half a cosine, a straight line); wsd holds peak_lr until
    decay_start, then falls as 1 - sqrt(progress) to min_lr at decay_steps (llm.c's cooldown,
    from Hägele et al. 2024, which found it better than a linear one). min_lr holds after
    decay_steps, so a run resumed for longer carries on at the floor."""
    s = schedule
    if step < s.warmup_steps:
        return warmup_lr(step, s.peak_lr, s.warmup_steps, s.initial_lr)
    if s.kind == "constant":
        return s.peak_lr
    if s.kind == "cosine":
        return warmup_cosine_lr(step, s.peak_lr, s.decay_steps, s.warmup_steps, s.initial_lr, s.min_lr)
    start = s.warmup_steps if s.kind == "linear" else s.decay_start
    if step < start:                                                  # wsd's stable part
        return s.peak_lr
    progress = min((step - start) / max(s.decay_steps - start, 1), 1.0)
    if s.kind == "wsd":
        progress = math.sqrt(progress)
    return s.peak_lr - (s.peak_lr - s.min_lr) * progress
