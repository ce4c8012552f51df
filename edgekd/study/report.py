"""The study's report, read back from the run folder: ``REPRODUCTION.md`` (protocol, gates, the selection on the
validation split, test top-1 mean ± std per row, each row's paired difference against KD and against KD+L2E with
its standard error and paired t-test, convergence, commands, versions and wall time) and PNG plots. Each section's
Markdown is built in ``report_sections.py``, the plots in ``report_plots.py``.

Everything here reads only the files the runner wrote (``study.json``, ``gates.json``, ``selection.json``, each
cell's ``result.json`` / ``test.json``), so ``edgekd study --report-only`` redraws a report without training, and a
half-finished study reports the cells it has.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgekd.atomic import atomic_path
from edgekd.study.grid import ROWS, cell_folder
from edgekd.study.report_plots import plot_curves, plot_test
from edgekd.study.report_sections import (
    cells_section,
    commands_section,
    convergence_section,
    environment_section,
    gates_section,
    protocol_section,
    results_section,
    selection_section,
    table_rows,
)

__all__ = ["collect", "read_json", "write_report", "REPORT_NAME"]

REPORT_NAME = "REPRODUCTION.md"


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, None when the file is not there (a cell not finished yet)."""
    return json.loads(path.read_text()) if path.is_file() else None


def collect(out: str | Path) -> dict:
    """What the study folder holds: plan, gates, selection, the teacher, the student-aware teachers and, per row,
    the tested cells in seed order (``{row: {seed: cell}}``, each cell its result.json plus ``test``)."""
    out = Path(out)
    study = read_json(out / "study.json") or {}
    plan = study.get("plan", {})
    selection = read_json(out / "selection.json") or {}
    hp = {entry["param"]: entry["chosen"] for entry in selection.values()}
    seeds = plan.get("seeds", 0)
    rows: dict[str, dict[int, dict]] = {row: {} for row in ROWS}
    sh_teachers: dict[int, dict] = {}
    for seed in range(seeds):
        for row in ROWS:
            try:
                folder = out / cell_folder(row, seed, hp)
            except KeyError:  # a hyper-parameter this row needs is not chosen yet
                continue
            result, test = read_json(folder / "result.json"), read_json(folder / "test.json")
            if result is None or test is None or test.get("key") != result.get("key"):
                continue
            rows[row][seed] = {**result, "test": test["test"], "folder": str(folder.relative_to(out))}
        sh = read_json(out / cell_folder("sh-teacher", seed, {}) / "result.json")
        if sh is not None:
            sh_teachers[seed] = sh
    return {
        "study": study,
        "plan": plan,
        "gates": read_json(out / "gates.json"),
        "selection": selection,
        "hp": hp,
        "teacher": read_json(out / "teacher" / "result.json"),
        "long": read_json(out / cell_folder("vanilla-long", 0, {}) / "result.json"),
        "sh_teachers": sh_teachers,
        "rows": rows,
    }


def write_report(out: str | Path) -> Path:
    """Write ``REPRODUCTION.md`` and ``plots/*.png`` in ``out`` from what the study folder holds; returns the path."""
    out = Path(out)
    data = collect(out)
    profile = data["study"].get("profile", "?")
    lines = [
        "# Reproduction: classifier sharing (TH-KD, SH-KD) against KD and KD+L2E at one temperature",
        "",
        f"Profile `{profile}`, written by `edgekd study`. Numbers are as measured, whatever they say. "
        + (
            "This is a short smoke-test profile: its numbers check the pipeline, they are not evidence. "
            if profile != "full"
            else ""
        )
        + "Plots are in `plots/` next to this file.",
        "",
        "## Commands and time",
        "",
        *commands_section(data["study"].get("invocations", [])),
    ]
    lines += ["## Environment", "", *environment_section(), ""]
    if data["plan"]:
        lines += ["## Protocol", "", *protocol_section(data), ""]
        lines += ["## Gates (checked on validation before any distilled student trained)", "", *gates_section(data)]
        lines += ["## Hyper-parameters chosen on validation (seed 0)", "", *selection_section(data)]
        chosen = ", ".join(f"{k} {v:g}" for k, v in data["hp"].items())
        lines += [
            "## Results: test top-1",
            "",
            f"Chosen on validation: {chosen or '—'}. Mean ± sample std over seeds; Δ is the mean per-seed difference "
            "row − baseline in points, ± its standard error, with the two-sided paired t-test's p (n − 1 degrees "
            "of freedom). The teacher-head column is the frozen teacher head (for SH-KD: its student-aware "
            "teacher's head θ_s) applied to the student's embedding.",
            "",
            *results_section(data),
        ]
        lines += [
            "## Convergence: validation gain over the last epochs",
            "",
            f"Final validation top-1 minus the value {data['plan']['gates']['flat_fraction']:.0%} of the epochs "
            "earlier, per run (flat: small against the differences between rows).",
            "",
            *convergence_section(data),
        ]
        lines_ = table_rows(data["rows"])
        plots = out / "plots"
        if any(values for _, _, values in lines_):
            teacher = data["teacher"]["test"]["top1"] if data["teacher"] else None
            plot_test(lines_, teacher, plots / "test.png")
            plot_curves(data, plots / "curves.png")
            lines += ["![test top-1](plots/test.png)", "", "![validation curves](plots/curves.png)", ""]
        lines += cells_section(data)
    with atomic_path(out / REPORT_NAME) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return out / REPORT_NAME
