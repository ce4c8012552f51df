"""ROC curves on a log-scale FAR axis, written as a PNG (matplotlib's Agg canvas; no pyplot global state)."""

from __future__ import annotations

import os

import numpy as np

from edgekd.atomic import atomic_path
from edgekd.errors import EdgekdError

__all__ = ["plot_roc"]


def plot_roc(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    title: str = "ROC",
    far_range: tuple[float, float] | None = None,
) -> None:
    """Plot TAR against FAR (log x) for each named curve and write ``path`` atomically (temporary file + rename).

    Args:
        curves: ``{label: (fpr (K,), tpr (K,))}``, the label as the legend shows it (a readable name, not a data spec);
            points with FPR = 0 cannot be drawn on a log axis and are dropped.
        path: the PNG to write.
        title: figure title.
        far_range: x-axis limits; default from the smallest positive FPR to 1.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise EdgekdError("no ROC curves to plot")
    fig = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lowest = 1.0
    for name, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
        keep = fpr > 0
        if keep.any():
            lowest = min(lowest, float(fpr[keep].min()))
        ax.plot(fpr[keep], tpr[keep], label=str(name), linewidth=1.5)
    ax.set_xscale("log")
    ax.set_xlim(*(far_range or (min(lowest, 1e-1), 1.0)))
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("TAR (true accept rate)")
    ax.set_title(title)
    ax.grid(True, which="both", linestyle=":", linewidth=0.5)
    # below the axes, never over a curve: ROC curves can pass through any corner of the plot
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, fontsize=8, frameon=False)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
