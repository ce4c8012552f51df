"""The study's gates (``Gates`` in grid.py): checked before any distilled student trains; a failed gate raises
``GateError`` and stops the study.

1. capacity by size, before anything trains: the teacher has at least ``min_param_ratio`` × the student's parameters
   (the student at the teacher's width);
2. capacity on validation: the teacher's top-1 beats the seed-0 vanilla student's by ``min_gap_points``;
3. convergence: the vanilla student's validation curve is flat (it gains less than ``flat_max_gain_points`` over the
   last ``flat_fraction`` of its epochs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgekd.atomic import write_json
from edgekd.bundle import Bundle
from edgekd.errors import EdgekdError
from edgekd.eval.report import parameter_count
from edgekd.study.grid import Gates
from edgekd.study.stats import flat_gain

__all__ = ["GateError", "check_sizes", "check_gates"]


class GateError(EdgekdError):
    """A capacity or convergence gate failed: the study stops before any distilled student trains."""


def check_sizes(gates: Gates, teacher: Bundle, student: Bundle) -> dict:
    """Gate 1, before anything trains: teacher parameters ≥ ratio × the student's (both built untrained, the student
    at the teacher's width)."""
    count = lambda b: parameter_count(b.backbone) + parameter_count(b.head)  # noqa: E731
    t, s = count(teacher), count(student)
    info = {"teacher_params": t, "student_params": s, "ratio": t / s, "min_ratio": gates.min_param_ratio}
    if t < gates.min_param_ratio * s:
        raise GateError(
            f"capacity gap not met: the teacher has {t:,} parameters, {t / s:.1f}× the student's {s:,} "
            f"(at teacher width); the study needs ≥ {gates.min_param_ratio:g}×: use a larger teacher or a smaller "
            "student"
        )
    return info


def check_gates(gates: Gates, sizes: dict, teacher: dict, vanilla: dict, out: Path, log: Callable[[str], None]) -> dict:
    """Gates 2-3, on validation, before any distilled student trains: ``teacher`` and ``vanilla`` are their cells'
    results, ``sizes`` gate 1's numbers; writes ``gates.json`` in ``out`` (a failed gate too) and logs the numbers."""
    t_val, s_val = teacher["val"]["top1"], vanilla["val"]["top1"]
    gap = 100 * (t_val - s_val)
    gain, window = flat_gain(vanilla["val_curve"], gates.flat_fraction)
    info = {
        **sizes,
        "teacher_val_top1": t_val,
        "vanilla_val_top1": s_val,
        "gap_points": gap,
        "min_gap_points": gates.min_gap_points,
        "vanilla_flat_gain_points": 100 * gain,
        "flat_window_epochs": window,
        "max_flat_gain_points": gates.flat_max_gain_points,
    }
    write_json(out / "gates.json", info)
    log(
        f"gates: teacher {sizes['ratio']:.1f}× the student's parameters; val top-1 teacher {100 * t_val:.2f}% vs "
        f"vanilla {100 * s_val:.2f}% (gap {gap:.2f} points); vanilla gained {100 * gain:+.2f} points over its "
        f"last {window} epochs"
    )
    if gap < gates.min_gap_points:
        raise GateError(
            f"capacity gap not met: the teacher's validation top-1 {100 * t_val:.2f}% is only {gap:.2f} points "
            f"above the vanilla student's {100 * s_val:.2f}%; the study needs ≥ {gates.min_gap_points:g}: "
            "use a stronger teacher or a weaker student"
        )
    if not 100 * gain < gates.flat_max_gain_points:
        raise GateError(
            f"the vanilla student is not trained to a flat validation curve: it gained {100 * gain:.2f} points "
            f"over its last {window} epochs (the study needs < {gates.flat_max_gain_points:g}); train it longer"
        )
    return info
