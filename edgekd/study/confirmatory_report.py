"""Study v3's report, read back from the run folder: ``REPRODUCTION.md`` with, per arm, the gates, each row's mean
± std, the pre-registered paired contrasts (mean difference, 95 % CI, two-sided paired t p, Holm-adjusted p within
the arm, the SD of the per-seed differences and the effect that SD lets the seeds detect at 80 % power) and every
per-seed cell. It reads only the files the runner wrote, so a half-finished study reports what it has (and says so).
"""

from __future__ import annotations

import math
from pathlib import Path

from edgekd.atomic import atomic_path
from edgekd.study.cells import Cell
from edgekd.study.confirmatory import Arm, build_arms
from edgekd.study.report import read_json
from edgekd.study.report_sections import (
    commands_section,
    environment_section,
    format_p,
    markdown_table,
    mean_pm,
)
from edgekd.study.stats import detectable_effect, holm, mean_std, paired

__all__ = ["collect_arm", "arm_metric", "write_confirmatory_report", "contrast_rows"]

REPORT_NAME = "REPRODUCTION.md"
_FAR = "0.01"  # the face arm's secondary metric, TAR at FAR 1e-2 (3,000 impostors resolve it)


def collect_arm(out: Path, arm: Arm) -> dict:
    """``{"teacher": result, "rows": {row: {seed: cell}}}``: the arm's finished cells (result.json + ``test``)."""
    root = out / arm.name
    rows: dict[str, dict[int, dict]] = {row: {} for row in arm.rows}
    for seed in arm.seeds:
        for row in arm.rows:
            folder = root / Cell.student(row, seed, arm.params).folder
            result, test = read_json(folder / "result.json"), read_json(folder / "test.json")
            if result is None or test is None or test.get("key") != result.get("key"):
                continue
            rows[row][seed] = {**result, "test": test["test"]}
    return {"teacher": read_json(root / "teacher" / "result.json"), "rows": rows}


def arm_metric(arm: Arm, cell: dict) -> float:
    """The arm's primary metric of a cell, a fraction: test top-1, or 10-fold verification accuracy."""
    return cell["test"]["top1"] if arm.metric == "top1" else cell["verify"]["accuracy"]


def _secondary(arm: Arm, cell: dict) -> float:
    """Top-1 through the frozen teacher head (fmnist), or TAR@FAR 1e-2 on the held-out pairs (faces)."""
    if arm.metric == "top1":
        return cell["test"].get("top1_th", math.nan)
    return cell["verify"]["tar_at_far"].get(_FAR, math.nan)


def contrast_rows(arm: Arm, rows: dict[str, dict[int, dict]]) -> list[dict]:
    """Each contrast over the seeds both rows finished: n, mean difference, CI, p, Holm p, SD, detectable effect
    (all differences in points)."""
    found = []
    for c in arm.contrasts:
        seeds = sorted(set(rows[c.row]) & set(rows[c.control]))
        a = [arm_metric(arm, rows[c.row][s]) for s in seeds]
        b = [arm_metric(arm, rows[c.control][s]) for s in seeds]
        test = paired(a, b)
        sd = test.se * math.sqrt(test.n) if test.n >= 2 else math.nan
        found.append(
            {
                "contrast": c,
                "n": test.n,
                "mean": 100 * test.mean,
                "ci": tuple(100 * v for v in test.ci()),
                "p": test.p,
                "sd": 100 * sd,
                "detectable": 100 * detectable_effect(sd, test.n) if test.n >= 3 else math.nan,
            }
        )
    adjusted = holm([r["p"] if not math.isnan(r["p"]) else 1.0 for r in found])
    for r, p in zip(found, adjusted, strict=True):
        r["holm"] = p
    return found


def _mark(passed: bool) -> str:
    return "✓" if passed else "✗"


def _gate_lines(arm: Arm, data: dict) -> list[str]:
    teacher = data["teacher"]
    if teacher is None:
        return ["The teacher has not finished.", ""]
    control = "vanilla" if "vanilla" in arm.rows else "kd"
    values = [arm_metric(arm, c) for c in data["rows"][control].values()]
    t_value = teacher["test"]["top1"] if arm.metric == "top1" else teacher["verify"]["accuracy"]
    what = "test top-1" if arm.metric == "top1" else "verification accuracy on held-out identities"
    lines = [f"- teacher {what}: **{100 * t_value:.2f} %**"]
    if values:
        student_params = next(iter(data["rows"][control].values()))["backbone_params"]
        mean = 100 * mean_std(values)[0]
        gap = 100 * t_value - mean
        gates = arm.profile.gates
        ratio = teacher["backbone_params"] / student_params
        lines += [
            f"- {control} students (mean of {len(values)} seeds): {mean:.2f} %; teacher ahead by **{gap:+.2f}** "
            f"points (required: ≥ {gates.min_gap_points:g}) {_mark(gap >= gates.min_gap_points)}",
            f"- backbone parameters teacher / student: {teacher['backbone_params']:,} / {student_params:,} = "
            f"{ratio:.1f}× (required: ≥ {gates.min_param_ratio:g}×) {_mark(ratio >= gates.min_param_ratio)}",
        ]
        if gap < gates.min_gap_points or ratio < gates.min_param_ratio:
            lines.append(
                "- **A gate failed**: as the plan says, this arm is reported but not read as a test of the teacher "
                "head with a real capacity gap."
            )
    return lines + [""]


def _arm_section(arm: Arm, data: dict) -> list[str]:
    rows = data["rows"]
    metric = "test top-1 %" if arm.metric == "top1" else "verification accuracy % (10-fold, held-out identities)"
    second = "top-1 % through the teacher head" if arm.metric == "top1" else "TAR % at FAR 1e-2"
    done = sum(len(v) for v in rows.values())
    planned = len(arm.rows) * len(arm.seeds)
    hp = ", ".join(f"{k} {v:g}" for k, v in arm.params.items())
    lines = [f"## Arm `{arm.name}`", ""]
    if done < planned:
        lines += [f"**Incomplete: {done} of {planned} student cells finished.** The numbers cover those only.", ""]
    lines += [f"Fixed hyper-parameters: {hp}; seeds {arm.seeds[0]}..{arm.seeds[-1]}.", "", "### Gates", ""]
    lines += _gate_lines(arm, data)
    body = [
        [row, str(len(rows[row])), mean_pm([arm_metric(arm, c) for c in rows[row].values()]),
         mean_pm([_secondary(arm, c) for c in rows[row].values()])]
        for row in arm.rows
    ]  # fmt: skip
    lines += ["### Rows", "", *markdown_table(["row", "seeds", f"{metric}, mean ± std", second], body), ""]
    lines += ["### Pre-registered contrasts", ""]
    body = []
    for r in contrast_rows(arm, rows):
        c = r["contrast"]
        body.append(
            [
                ("**primary** " if c.primary else "") + f"{c.row} − {c.control}",
                str(r["n"]),
                f"{r['mean']:+.2f}",
                f"[{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}]",
                format_p(r["p"]),
                format_p(r["holm"]),
                f"{r['sd']:.2f}",
                f"{r['detectable']:.2f}",
            ]
        )
    header = ["contrast", "n", "Δ points", "95 % CI", "p", "Holm p", "SD of Δ", "detectable Δ (80 %)"]
    lines += markdown_table(header, body)
    lines += [
        "",
        "Δ: mean per-seed difference; CI: mean ± t(0.975, n − 1)·SE; p: two-sided paired t; Holm p: adjusted over "
        "this arm's contrasts; detectable Δ: the true difference a paired t-test at α 0.05 finds with 80 % power, "
        "given the measured SD and n.",
        "",
        "### Per-seed cells",
        "",
    ]
    body = [
        [str(seed)]
        + [f"{100 * arm_metric(arm, rows[row][seed]):.2f}" if seed in rows[row] else "—" for row in arm.rows]
        for seed in arm.seeds
    ]
    return lines + markdown_table(["seed", *arm.rows], body) + [""]


def write_confirmatory_report(out: str | Path) -> Path:
    """Write ``out/REPRODUCTION.md`` from the study folder; returns its path."""
    out = Path(out)
    study = read_json(out / "study.json") or {}
    arms = build_arms(study.get("profile", "v3"))
    lines = [
        "# Reproduction: study v3, the confirmatory test of classifier sharing",
        "",
        f"Profile `{study.get('profile', 'v3')}`, written by `edgekd study --v3`, following the plan committed "
        "before any v3 run (docs/results/study/v3/PLAN.md). Numbers are as measured, whatever they say.",
        "",
        "## Commands and time",
        "",
        *commands_section(study.get("invocations", [])),
        "## Environment",
        "",
        *environment_section(),
        "",
    ]
    for arm in arms:
        lines += _arm_section(arm, collect_arm(out, arm))
    path = out / REPORT_NAME
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines))
    return path
