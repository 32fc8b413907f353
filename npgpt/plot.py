"""The plots npgpt draws: the book's loss plot (train and validation loss against epochs or steps, tokens
seen on a second x axis) and the learning-rate schedules side by side (docs/schedules.png)."""
from __future__ import annotations

from pathlib import Path


def plot_losses(num_epochs, tokens_seen, train_losses, val_losses, path, steps=None) -> Path:
    """Write a PNG of the losses recorded at each evaluation, against epochs, or against the given
    steps (a run by steps); returns its path."""
    import matplotlib
    matplotlib.use("Agg")            # files only: no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.linspace(0, num_epochs, len(train_losses)) if steps is None else steps
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(x, train_losses, label="Training loss")
    ax1.plot(x, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs" if steps is None else "Steps")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax2 = ax1.twiny()                # same curves, against tokens seen
    ax2.plot(tokens_seen, train_losses, alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_schedules(path, steps: int = 19073, warmup: int = 715, peak_lr: float = 6e-4, final_lr_frac: float = 0.1,
                   decay_fraction: float = 0.2) -> Path:
    """Write a PNG of the four --schedule kinds side by side for one run length (default: the GPT-2
    124M recipe's 19,073 steps, 715 of warmup, lr 6e-4 down to a tenth): docs/schedules.png is
    `python -c "from npgpt.plot import plot_schedules; plot_schedules('docs/schedules.png')"`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .run_state import Schedule
    from .training.schedule import scheduled_lr
    fig, axes = plt.subplots(1, 4, figsize=(12, 2.8), sharey=True)
    for ax, kind in zip(axes, ("constant", "cosine", "linear", "wsd")):
        decays = kind != "constant"
        s = Schedule(peak_lr, warmup_steps=warmup, kind=kind, decay_steps=steps if decays else None,
                     min_lr=final_lr_frac * peak_lr if decays else None,
                     decay_fraction=decay_fraction if kind == "wsd" else None)
        ax.plot(range(steps), [scheduled_lr(s, i) for i in range(steps)])
        ax.set_title(f"--schedule {kind}" + (f" (--decay-fraction {decay_fraction:g})" if kind == "wsd" else ""),
                     fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("learning rate")
    fig.suptitle(f"{steps:,} steps, --warmup {warmup}, --lr {peak_lr:g}, --final-lr-frac {final_lr_frac:g}",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
