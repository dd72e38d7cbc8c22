"""The sample grid of a benchmark (matplotlib, Agg backend): one row per class, one column
per sample set (data, teacher, student at each step count), a few samples each."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from .data import NUM_CLASSES  # noqa: E402

__all__ = ["plot_grid"]


def _strip(x: Tensor, labels: Tensor, c: int, per_cell: int) -> Tensor:
    """``per_cell`` samples of class ``c`` side by side, ``(H, per_cell * (W + 1))`` in [0, 1]."""
    picked = x[labels == c][:per_cell, 0].float().clamp(-1, 1) * 0.5 + 0.5
    pad = torch.ones(len(picked), picked.shape[1], 1)
    return torch.cat([picked, pad], 2).permute(1, 0, 2).reshape(picked.shape[1], -1)


def plot_grid(
    sets: dict[str, tuple[Tensor, Tensor]], path: str | Path, *, per_cell: int = 4
) -> None:
    """Write ``path`` (PNG): for each ``title -> (samples (N, 1, H, W), labels (N,))``, a column
    of ``per_cell`` samples of every class (white is 1, black is -1)."""
    cols = len(sets)
    fig, axes = plt.subplots(
        NUM_CLASSES, cols, figsize=(1.25 * cols * per_cell / 4, 0.36 * NUM_CLASSES + 0.5)
    )
    for j, (title, (x, labels)) in enumerate(sets.items()):
        for c in range(NUM_CLASSES):
            ax = axes[c, j]
            ax.imshow(_strip(x, labels, c, per_cell).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if c == 0:
                ax.set_title(title, fontsize=7)
    fig.subplots_adjust(wspace=0.05, hspace=0.05, left=0.01, right=0.99, bottom=0.01, top=0.93)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
