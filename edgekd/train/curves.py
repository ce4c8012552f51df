"""Training curves from ``metrics.jsonl`` files as one PNG: a panel per run, the total loss and its terms."""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgekd.atomic import atomic_path
from edgekd.errors import EdgekdError
from edgekd.losses.terms import TERM_NAMES

# Only the last line can be cut short by a kill; anything else was changed after the run wrote it.
_DAMAGED = "only a killed run's last line may be incomplete: mend or delete that line"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The lines of a ``metrics.jsonl`` file (one JSON object per logged step).

    The training loop appends a line at a time, so a killed run can leave only its last line cut short: that line is
    skipped. A line before it that is not a JSON object is damage no kill makes: a one-line error naming the line."""
    path = Path(path)
    try:
        lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgekdError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    rows = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if n == lines[-1][0]:
                break  # the line a killed writer left half-written
            raise EdgekdError(f"{path}, line {n}: not JSON ({exc.msg}); {_DAMAGED}") from None
        if not isinstance(row, dict):
            raise EdgekdError(f"{path}, line {n}: not a JSON object; {_DAMAGED}")
        rows.append(row)
    return rows


def plot_loss_curves(runs: dict[str, str | os.PathLike], path: str | os.PathLike) -> None:
    """Write ``path``: for each named ``metrics.jsonl``, the total loss and each active (unweighted) term by step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Loss lines only: verification lines (--eval-every) share the file and carry scores instead.
    series = {name: [r for r in read_metrics(p) if "loss" in r] for name, p in runs.items()}
    series = {name: rows for name, rows in series.items() if rows}
    if not series:
        raise EdgekdError("no training metrics to plot")
    fig = Figure(figsize=(5 * len(series), 3.8), dpi=110)
    FigureCanvasAgg(fig)
    for i, (name, rows) in enumerate(series.items(), 1):
        ax = fig.add_subplot(1, len(series), i)
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["loss"] for r in rows], color="black", linewidth=1.8, label="total (weighted sum)")
        for term in TERM_NAMES:
            if any(r.get(term) for r in rows):
                ax.plot(steps, [r.get(term, float("nan")) for r in rows], linewidth=1.0, label=term)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (terms unweighted)" if i == 1 else "")
        ax.grid(True, linestyle=":", linewidth=0.5)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
