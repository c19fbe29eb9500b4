"""Plots: loss curve, t-SNE of embeddings, a query beside its results. Files are written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from imgsim.runs import temp_path_beside  # noqa: E402


def save_figure(fig: plt.Figure, out: str | os.PathLike[str]) -> Path:
    """Save `fig` as PNG at `out` atomically and close it."""
    out = Path(out)
    tmp = temp_path_beside(out)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return out


def plot_loss(
    losses: Sequence[float], out: str | os.PathLike[str], val_losses: Sequence[float] | None = None
) -> Path:
    """Training loss per epoch."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = range(1, len(losses) + 1)
    ax.plot(epochs, losses, marker="o", label="train loss")
    if val_losses:
        ax.plot(range(1, len(val_losses) + 1), val_losses, marker="s", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("imgsim autoencoder training")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out)
