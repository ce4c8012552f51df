"""The body of each ``REPRODUCTION.md`` section, as Markdown lines, from ``collect``'s data: the commands and their
wall time, the environment, the protocol, the gates, the selection on validation, the results (test top-1 mean ± std
per row, each row's paired difference against KD and against KD+L2E with its standard error and paired t-test), the
convergence and every tested cell."""

from __future__ import annotations

import math
import platform

import numpy as np

from edgekd.losses import LossWeights
from edgekd.study.grid import ROWS, SWEPT
from edgekd.study.stats import flat_gain, mean_std, paired
from edgekd.utils.env import environment

__all__ = [
    "table_rows",
    "commands_section",
    "environment_section",
    "protocol_section",
    "gates_section",
    "selection_section",
    "results_section",
    "convergence_section",
    "cells_section",
    "markdown_table",
    "mean_pm",
    "format_p",
    "duration",
]

BASELINES = ("kd", "kd+l2e")
_LABEL = {
    "vanilla": "vanilla",
    "kd": "KD",
    "kd+th": "KD+TH",
    "th-kd/paper": "TH-KD paper, student head",
    "th-kd/paper:p′": "TH-KD paper, p′ = (1−α)·p_s + α·p_th",
    "kd+l2e": "KD+L2E",
    "kd+l2e+th": "KD+L2E+TH",
    "sh-kd/th": "SH-KD, TH form (head from θ_s, th_kd through θ_s)",
    "sh-kd/official": "SH-KD, fresh head, KD+L2E (the official code's I2 is CRD+KD)",
}


def table_rows(rows: dict[str, dict[int, dict]]) -> list[tuple[str, str, dict[int, float]]]:
    """``(label key, row, {seed: test top-1})`` per line of the results table; TH-KD paper gives two lines."""
    out = []
    for row in ROWS:
        cells = rows.get(row, {})
        out.append((row, row, {s: c["test"]["top1"] for s, c in cells.items()}))
        if row == "th-kd/paper":
            out.append(("th-kd/paper:p′", row, {s: c["test"]["top1_pprime"] for s, c in cells.items()}))
    return out


# --------------------------------------------------------------------------------------------- formatting


def mean_pm(values: list[float], scale: float = 100.0) -> str:
    """``84.85 ± 0.45``: mean ± sample std of fractions, in points (``—`` for none, ``n/a`` for one value's std)."""
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{scale * mean:.2f} ± {'n/a' if math.isnan(std) else f'{scale * std:.2f}'}"


def _diff(a: dict[int, float], b: dict[int, float]) -> str:
    """``+0.12 ± 0.05 (p 0.07)``: paired difference in points over the seeds both have, its SE and t-test p."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return "—"
    p = paired([a[s] for s in seeds], [b[s] for s in seeds])
    if p.n < 2:
        return f"{100 * p.mean:+.2f} (1 seed)"
    if p.mean == 0.0 and p.se == 0.0:
        return "0 (identical)"
    return f"{100 * p.mean:+.2f} ± {100 * p.se:.2f} (p {format_p(p.p)})"


def format_p(p: float) -> str:
    return "n/a" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else "< 0.001")


def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(cells) + " |" for cells in body
    ]


def duration(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {sec:02d} s"


def _short_commit(commit: str | None) -> str:
    """``abc1234`` (``+dirty`` kept) of a full commit id; a dash for invocations that recorded none."""
    if not commit:
        return "—"
    sha, plus, dirty = commit.partition("+")
    return f"`{sha[:7]}{plus}{dirty}`"


# --------------------------------------------------------------------------------------------- sections


def commands_section(invocations: list[dict]) -> list[str]:
    """Every invocation of the study: its command, start, code and wall time, then their total."""
    body = []
    for i in invocations:
        state = "" if i.get("finished", True) else " (interrupted or running)"
        if i.get("gate_failed"):
            state = " (stopped by a gate)"
        body.append([f"`{i['command'] or '(API)'}`", i["started"], _short_commit(i.get("commit")),
                     duration(i["seconds"]) + state])  # fmt: skip
    total = sum(i["seconds"] for i in invocations)
    lines = markdown_table(["command", "started (UTC)", "code (git commit)", "wall time"], body)
    return lines + ["", f"Total wall time of the invocations: **{duration(total)}**.", ""]


def environment_section() -> list[str]:
    env = environment()
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    threads = env.get("threads", {})
    return [
        f"- versions: {versions}",
        f"- platform: {env.get('platform', platform.platform())}",
        f"- CPU: {env.get('cpu')}; GPU: {(env.get('gpu') or {}).get('name', 'none')}",
        f"- threads: torch {threads.get('torch_threads')}, usable CPUs {threads.get('usable_cpus')}",
    ]


def _clip_text(trainee: dict) -> str:
    clip = trainee.get("clip_grad", 5.0)  # study v2's plans predate the field: every v2 run was clipped at 5
    return "off" if not clip else f"at norm {clip:g}"


def protocol_section(data: dict) -> list[str]:
    plan = data["plan"]
    t, s = plan["teacher"], plan["student"]
    n = plan.get("train_images")
    gates = data["gates"] or {}
    t_params = gates.get("teacher_params")
    s_params = gates.get("student_params")
    sizes = f" ({t_params:,} parameters)" if t_params else ""
    s_sizes = f" ({s_params:,} parameters)" if s_params else ""
    width = next((c["embed_dim"] for r in data["rows"].values() for c in r.values()), None)
    limit = f"; evaluation on the first {plan['eval_limit']} images of each split" if plan.get("eval_limit") else ""
    return [
        f"- data `{plan['data']}`: training on "
        + (f"a fixed random subset of {n:,} images" if n else "all 55,000 images")
        + " of the training split; validation: the seeded 5,000-image split carved out of the training set "
        "(never trained on); test: the 10,000-image test split" + limit,
        f"- teacher `{t['model']}` {t['model_kwargs']}{sizes}: {t['epochs']} epochs, lr {t['lr']:g}, batch "
        f"{t['batch_size']}, seed 0, one teacher for every seed",
        f"- student `{s['model']}` {s['model_kwargs']}{s_sizes}, built at the teacher's embedding width"
        + (f" ({width})" if width else "")
        + f" for every row: {s['epochs']} epochs, lr {s['lr']:g}, batch {s['batch_size']}",
        f"- SGD momentum 0.9, weight decay {plan['weight_decay']:g}, {plan['warmup_steps']} warm-up steps then "
        f"(1 − t)^{plan.get('lr_power', 1.0):g} decay to 0 (t: the fraction of steps after the warm-up), "
        f"gradient-norm clip {_clip_text(t)} (teacher) / {_clip_text(s)} (students), random horizontal flips; "
        "one checkpoint per epoch (the validation curves below)",
        f"- seeds 0..{plan['seeds'] - 1}: seed k fixes the initialization and the data order, identical for every row",
        f"- KD weight k = {plan['sweeps']['kd']:g} in every KD row; T_th = T (one matched temperature)",
        "- SH-KD: per seed, a student-aware teacher (stage I1: the teacher's architecture and recipe on seed k, its "
        "head the seed's vanilla student's θ_s, frozen) serves both SH-KD forms; the vanilla student is stage I0",
    ]


def gates_section(data: dict) -> list[str]:
    gates, plan = data["gates"], data["plan"]
    if gates is None:
        return ["Not checked yet.", ""]
    g = plan["gates"]
    ok = lambda good: "✓" if good else "✗ (stopped the study)"  # noqa: E731
    body = [
        [
            "teacher / student parameters",
            f"{gates['teacher_params']:,} / {gates['student_params']:,} = {gates['ratio']:.1f}×",
            f"≥ {g['min_param_ratio']:g}×",
            ok(gates["ratio"] >= g["min_param_ratio"]),
        ],
        [
            "val top-1: teacher − vanilla student (seed 0)",
            f"{100 * gates['teacher_val_top1']:.2f} − {100 * gates['vanilla_val_top1']:.2f} = "
            f"{gates['gap_points']:.2f} points",
            f"≥ {g['min_gap_points']:g} points",
            ok(gates["gap_points"] >= g["min_gap_points"]),
        ],
        [
            f"vanilla val gain over its last {gates['flat_window_epochs']} epochs",
            f"{gates['vanilla_flat_gain_points']:+.2f} points",
            f"< {g['flat_max_gain_points']:g} points",
            ok(gates["vanilla_flat_gain_points"] < g["flat_max_gain_points"]),
        ],
    ]
    lines = markdown_table(["gate", "measured", "required", ""], body) + [""]
    vanilla = data["rows"]["vanilla"].get(0)
    teacher, long = data["teacher"], data["long"]
    if long is not None:
        gain = 100 * (long["val"]["top1"] - gates["vanilla_val_top1"])
        lines += [
            f"Second convergence check (after the study, not a gate): the seed-0 vanilla student trained for "
            f"{long['epochs']} epochs, twice the students' schedule, reaches {100 * long['val']['top1']:.2f}% on "
            f"validation, {gain:+.2f} points against the {data['plan']['student']['epochs']}-epoch run.",
            "",
        ]
    curves = [("vanilla student, seed 0", vanilla), ("teacher", teacher), ("vanilla student, 2× epochs", long)]
    body = [
        [name, " ".join(f"{100 * v:.2f}" for v in c["val_curve"])] for name, c in curves if c and c.get("val_curve")
    ]
    if body:
        lines += ["Validation top-1 after each epoch:", ""]
        lines += markdown_table(["model", "val top-1 % per epoch"], body) + [""]
    return lines


def selection_section(data: dict) -> list[str]:
    sel = data["selection"]
    if not sel:
        return ["No selection yet.", ""]
    body = []
    for row, param in SWEPT.items():
        entry = sel.get(row)
        if entry is None:
            continue
        at = ", ".join(f"{k} {v:g}" for k, v in entry["at"].items()) or "—"
        scores = ", ".join(f"{param} {v}: {100 * s:.2f}" for v, s in entry["scores"].items())
        body.append([_LABEL[row], at, scores, f"{param} {entry['chosen']:g}"])
    return markdown_table(["row", "at", "val top-1 % (seed 0)", "chosen"], body) + [""]


def results_section(data: dict) -> list[str]:
    rows = data["rows"]
    lines_ = table_rows(rows)
    base = {k: v for k, _, v in lines_ if k in BASELINES}
    body = []
    for key, row, values in lines_:
        cells = rows[row]
        weights = LossWeights(**next(iter(cells.values()))["weights"]).describe() if cells else "—"
        if key == "th-kd/paper:p′" and cells:
            weights = f"α = {next(iter(cells.values()))['alpha']:g}"
        th = [c["test"]["top1_th"] for c in cells.values()] if key != "th-kd/paper:p′" else []
        body.append(
            [
                _LABEL[key],
                weights,
                mean_pm(list(values.values())),
                mean_pm(th) if th else "—",
                "—" if key == "kd" else _diff(values, base.get("kd", {})),
                "—" if key == "kd+l2e" else _diff(values, base.get("kd+l2e", {})),
                str(len(values)),
            ]
        )
    header = [
        "row",
        "weights",
        "test top-1 %",
        "teacher head on the student embedding %",
        "Δ vs KD (points, ± SE, paired t p)",
        "Δ vs KD+L2E",
        "seeds",
    ]
    out = markdown_table(header, body) + [""]
    teacher, sh = data["teacher"], data["sh_teachers"]
    if teacher:
        body = [
            [
                "teacher (seed 0, every seed's)",
                f"{teacher['params']:,}",
                f"{100 * teacher['val']['top1']:.2f}",
                f"{100 * teacher['test']['top1']:.2f}",
                "1",
            ]
        ]
        if sh:
            ts = list(sh.values())
            body.append(
                [
                    "student-aware teachers (SH-KD I1, one per seed)",
                    f"{ts[0]['params']:,}",
                    mean_pm([t["val"]["top1"] for t in ts]),
                    mean_pm([t["test"]["top1"] for t in ts]),
                    str(len(ts)),
                ]
            )
        out += ["Teachers:", ""] + markdown_table(
            ["teacher", "parameters", "val top-1 %", "test top-1 %", "seeds"], body
        )
        out += [""]
    return out


def convergence_section(data: dict) -> list[str]:
    frac = data["plan"]["gates"]["flat_fraction"]
    body = []
    for row in ROWS:
        gains = [flat_gain(c["val_curve"], frac) for c in data["rows"][row].values() if c.get("val_curve")]
        if not gains:
            continue
        values = [100 * g for g, _ in gains]
        body.append([_LABEL[row], str(gains[0][1]), f"{np.mean(values):+.2f}", f"{max(values):+.2f}", str(len(values))])
    for name, cells in (
        ("teacher", [data["teacher"]] if data["teacher"] else []),
        ("student-aware teachers", list(data["sh_teachers"].values())),
    ):
        gains = [flat_gain(c["val_curve"], frac) for c in cells if c.get("val_curve")]
        if gains:
            values = [100 * g for g, _ in gains]
            body.append([name, str(gains[0][1]), f"{np.mean(values):+.2f}", f"{max(values):+.2f}", str(len(values))])
    if not body:
        return []
    return markdown_table(["model", "last epochs", "mean val gain (points)", "largest", "runs"], body) + [""]


def cells_section(data: dict) -> list[str]:
    body = []
    for row in ROWS:
        for seed, c in sorted(data["rows"][row].items()):
            t = c["test"]
            body.append(
                [
                    row,
                    str(seed),
                    f"{100 * t['top1']:.2f}",
                    f"{100 * t['top1_pprime']:.2f}" if "top1_pprime" in t else "—",
                    f"{100 * t['top1_th']:.2f}",
                    f"{100 * c['val']['top1']:.2f}",
                    f"{c['train_seconds']:.0f}",
                    c["folder"],
                ]
            )
    return (
        ["<details><summary>Every tested cell</summary>", ""]
        + markdown_table(
            ["row", "seed", "test top-1 %", "p′ %", "teacher head %", "val top-1 %", "train s", "folder"], body
        )
        + ["", "</details>", ""]
    )
