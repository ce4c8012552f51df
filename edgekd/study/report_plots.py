"""The study report's plots, drawn from ``collect``'s data into ``plots/``: test top-1 per row (mean ± std over the
seeds, each seed a dot) and the validation curves per epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekd.atomic import atomic_path
from edgekd.study.grid import ROWS

__all__ = ["plot_test", "plot_curves"]

_SHORT = {
    "vanilla": "vanilla",
    "kd": "KD",
    "kd+th": "KD+TH",
    "th-kd/paper": "TH-KD paper\nstudent head",
    "th-kd/paper:p′": "TH-KD paper\np′",
    "kd+l2e": "KD+L2E",
    "kd+l2e+th": "KD+L2E+TH",
    "sh-kd/th": "SH-KD\nTH form",
    "sh-kd/official": "SH-KD\nfresh head",
}


def _color(index: int) -> str:
    return f"C{[0, 1, 2, 3, 4, 5, 6, 8, 9, 7][index % 10]}"


def plot_test(lines: list[tuple[str, str, dict[int, float]]], teacher: float | None, path: Path) -> None:
    """A bar of test top-1 per results line (``table_rows``): mean ± std, a dot per seed, the teacher's dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [line for line in lines if line[2]]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.95 * len(lines) + 2), 4.6))
    x = np.arange(len(lines))
    values = [[100 * v for v in line[2].values()] for line in lines]
    means = [float(np.mean(v)) for v in values]
    stds = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in values]
    # Points with error bars, not bars: a bar's length reads as the value, so bars would have to start at 0, where
    # differences of tenths of a point vanish; a point's axis may start anywhere without misleading.
    for i in range(len(lines)):
        ax.errorbar(x[i], means[i], yerr=stds[i], fmt="D", markersize=7, capsize=5, color=_color(i))
    for i, v in enumerate(values):
        ax.scatter(np.full(len(v), x[i]) + np.linspace(-0.18, 0.18, len(v)), v, s=10, color="k", zorder=3)
    low, high = min(min(v) for v in values), max(max(v) for v in values)
    if teacher is not None:
        ax.axhline(100 * teacher, color="0.4", linestyle="--", label=f"teacher {100 * teacher:.2f}")
        high = max(high, 100 * teacher)
        ax.legend(loc="lower right", fontsize=8)
    pad = max(0.3, 0.1 * (high - low))
    ax.set_ylim(max(0.0, low - pad), min(100.0, high + pad))
    ax.set_xticks(x, [_SHORT[k] for k, _, _ in lines], fontsize=7.5)
    ax.set_ylabel("test top-1 %")
    ax.grid(axis="y", alpha=0.3)
    n = max(len(v) for v in values)
    ax.set_title(f"Fashion-MNIST test top-1, mean ± std over {n} seed(s) (dots: seeds)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_curves(data: dict, path: Path) -> None:
    """Validation top-1 per epoch: each row's mean over seeds and the teachers (left), the students' last half."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for i, row in enumerate(ROWS):
        curves = [c["val_curve"] for c in data["rows"][row].values() if c.get("val_curve")]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = 100 * np.mean([c[:n] for c in curves], axis=0)
        for ax in axes:
            ax.plot(
                np.arange(1, n + 1), mean, label=_SHORT[row].replace("\n", ", "), color=_color(i), marker="o", ms=2.5
            )
    teachers = [("teacher", data["teacher"])] + [(f"student-aware seed {s}", t) for s, t in data["sh_teachers"].items()]
    for name, t in teachers:
        if t and t.get("val_curve"):
            c = 100 * np.asarray(t["val_curve"])
            axes[0].plot(
                np.arange(1, len(c) + 1),
                c,
                color="0.3" if name == "teacher" else "0.7",
                linestyle="--",
                label=name if name == "teacher" or name.endswith("seed 0") else None,
            )
    axes[0].set_title("validation top-1 per epoch (students: mean over seeds)")
    axes[1].set_title("students, last half of training")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 %")
        ax.grid(alpha=0.3)
    student_curves = [c["val_curve"] for r in ROWS for c in data["rows"][r].values() if c.get("val_curve")]
    if student_curves:
        n = min(len(c) for c in student_curves)
        tail = np.array([c[n // 2 : n] for c in student_curves]) * 100
        axes[1].set_xlim(n // 2 + 0.5, n + 0.3)
        axes[1].set_ylim(tail.min() - 0.3, tail.max() + 0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
