"""The book's loss plot: train and validation loss against epochs (or steps), tokens seen on a second x axis."""
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
