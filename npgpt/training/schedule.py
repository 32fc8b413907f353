"""Appendix D's learning-rate schedule: linear warmup, then cosine decay."""
from __future__ import annotations

import math


def warmup_cosine_lr(step, peak_lr, total_steps, warmup_steps=0, initial_lr=3e-5, min_lr=1e-6, cosine=True):
    """Appendix D's learning rate at global step `step` (0-based): linear from initial_lr to peak_lr
    over warmup_steps, then half a cosine from peak_lr down to min_lr at total_steps (or constant)."""
    if step < warmup_steps:
        return initial_lr + step * (peak_lr - initial_lr) / warmup_steps
    if not cosine:
        return peak_lr
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
