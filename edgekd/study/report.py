"""The study's report, read back from the run folder: ``REPRODUCTION.md`` (protocol, gates, the selection on the
validation split, test top-1 mean ± std per row, each row's paired difference against KD and against KD+L2E with
its standard error and paired t-test, convergence, commands, versions and wall time) and PNG plots.

Everything here reads only the files the runner wrote (``study.json``, ``gates.json``, ``selection.json``, each
cell's ``result.json`` / ``test.json``), so ``edgekd study --report-only`` redraws a report without training, and a
half-finished study reports the cells it has.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import numpy as np

from edgekd.atomic import atomic_path
from edgekd.study.grid import ROWS, SWEPT, cell_folder
from edgekd.study.stats import flat_gain, mean_std, paired
from edgekd.utils.env import environment

__all__ = ["collect", "write_report", "table_rows", "REPORT_NAME"]

REPORT_NAME = "REPRODUCTION.md"
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
    "sh-kd/official": "SH-KD, official form (fresh head)",
}

_SHORT = {
    "vanilla": "vanilla",
    "kd": "KD",
    "kd+th": "KD+TH",
    "th-kd/paper": "TH-KD paper\nstudent head",
    "th-kd/paper:p′": "TH-KD paper\np′",
    "kd+l2e": "KD+L2E",
    "kd+l2e+th": "KD+L2E+TH",
    "sh-kd/th": "SH-KD\nTH form",
    "sh-kd/official": "SH-KD\nofficial form",
}


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(out: str | Path) -> dict:
    """What the study folder holds: plan, gates, selection, the teacher, the student-aware teachers and, per row,
    the tested cells in seed order (``{row: {seed: cell}}``, each cell its result.json plus ``test``)."""
    out = Path(out)
    study = _read(out / "study.json") or {}
    plan = study.get("plan", {})
    selection = _read(out / "selection.json") or {}
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
            result, test = _read(folder / "result.json"), _read(folder / "test.json")
            if result is None or test is None or test.get("key") != result.get("key"):
                continue
            rows[row][seed] = {**result, "test": test["test"], "folder": str(folder.relative_to(out))}
        sh = _read(out / cell_folder("sh-teacher", seed, {}) / "result.json")
        if sh is not None:
            sh_teachers[seed] = sh
    return {
        "study": study,
        "plan": plan,
        "gates": _read(out / "gates.json"),
        "selection": selection,
        "hp": hp,
        "teacher": _read(out / "teacher" / "result.json"),
        "long": _read(out / cell_folder("vanilla-long", 0, {}) / "result.json"),
        "sh_teachers": sh_teachers,
        "rows": rows,
    }


def _metric(cell: dict, key: str) -> float:
    return cell["test"][key]


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


def _pm(values: list[float], scale: float = 100.0) -> str:
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
    return f"{100 * p.mean:+.2f} ± {100 * p.se:.2f} (p {_p(p.p)})"


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else "< 0.001")


def weight_text(weights: dict) -> str:
    """``ce 1, kd 1, th_kd 1, T 4``: the non-zero terms and the (matched) temperature of their KL terms."""
    items = [f"{k} {weights[k]:g}" for k in ("ce", "kd", "th_ce", "th_kd", "l2e") if weights.get(k)]
    if weights.get("kd") or weights.get("th_kd"):
        T, T_th = weights.get("T"), weights.get("T_th", weights.get("T"))
        items.append(f"T {T:g}" if T == T_th or not weights.get("th_kd") else f"T {T:g}, T_th {T_th:g}")
    return ", ".join(items)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(cells) + " |" for cells in body
    ]


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {sec:02d} s"


def _short_commit(commit: str | None) -> str:
    """``abc1234`` (``+dirty`` kept) of a full commit id; a dash for invocations that recorded none."""
    if not commit:
        return "—"
    sha, plus, dirty = commit.partition("+")
    return f"`{sha[:7]}{plus}{dirty}`"


def _environment() -> list[str]:
    env = environment()
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    threads = env.get("threads", {})
    return [
        f"- versions: {versions}",
        f"- platform: {env.get('platform', platform.platform())}",
        f"- CPU: {env.get('cpu')}; GPU: {(env.get('gpu') or {}).get('name', 'none')}",
        f"- threads: torch {threads.get('torch_threads')}, usable CPUs {threads.get('usable_cpus')}",
    ]


# --------------------------------------------------------------------------------------------- plots


def _color(index: int) -> str:
    return f"C{[0, 1, 2, 3, 4, 5, 6, 8, 9, 7][index % 10]}"


def _plot_test(lines: list[tuple[str, str, dict[int, float]]], teacher: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [line for line in lines if line[2]]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.95 * len(lines) + 2), 4.6))
    x = np.arange(len(lines))
    values = [[100 * v for v in line[2].values()] for line in lines]
    means = [float(np.mean(v)) for v in values]
    stds = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in values]
    ax.bar(x, means, yerr=stds, capsize=4, color=[_color(i) for i in range(len(lines))], alpha=0.85)
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


def _plot_curves(data: dict, path: Path) -> None:
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


# --------------------------------------------------------------------------------------------- markdown


def _protocol(data: dict) -> list[str]:
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
        f"- SGD momentum 0.9, weight decay {plan['weight_decay']:g}, {plan['warmup_steps']} warm-up steps then linear "
        "decay to 0, random horizontal flips; one checkpoint per epoch (the validation curves below)",
        f"- seeds 0..{plan['seeds'] - 1}: seed k fixes the initialization and the data order, identical for every row",
        f"- KD weight k = {plan['sweeps']['kd']:g} in every KD row; T_th = T (one matched temperature)",
        "- SH-KD: per seed, a student-aware teacher (stage I1: the teacher's architecture and recipe on seed k, its "
        "head the seed's vanilla student's θ_s, frozen) serves both SH-KD forms; the vanilla student is stage I0",
    ]


def _gates(data: dict) -> list[str]:
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
    lines = _table(["gate", "measured", "required", ""], body) + [""]
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
        lines += _table(["model", "val top-1 % per epoch"], body) + [""]
    return lines


def _selection(data: dict) -> list[str]:
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
    return _table(["row", "at", "val top-1 % (seed 0)", "chosen"], body) + [""]


def _results(data: dict) -> list[str]:
    rows = data["rows"]
    lines_ = table_rows(rows)
    base = {k: v for k, _, v in lines_ if k in BASELINES}
    body = []
    for key, row, values in lines_:
        cells = rows[row]
        weights = weight_text(next(iter(cells.values()))["weights"]) if cells else "—"
        if key == "th-kd/paper:p′" and cells:
            weights = f"α = {next(iter(cells.values()))['alpha']:g}"
        th = [c["test"]["top1_th"] for c in cells.values()] if key != "th-kd/paper:p′" else []
        body.append(
            [
                _LABEL[key],
                weights,
                _pm(list(values.values())),
                _pm(th) if th else "—",
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
    out = _table(header, body) + [""]
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
                    _pm([t["val"]["top1"] for t in ts]),
                    _pm([t["test"]["top1"] for t in ts]),
                    str(len(ts)),
                ]
            )
        out += ["Teachers:", ""] + _table(["teacher", "parameters", "val top-1 %", "test top-1 %", "seeds"], body)
        out += [""]
    return out


def _convergence(data: dict) -> list[str]:
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
    return _table(["model", "last epochs", "mean val gain (points)", "largest", "runs"], body) + [""]


def _cells(out: Path, data: dict) -> list[str]:
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
        + _table(["row", "seed", "test top-1 %", "p′ %", "teacher head %", "val top-1 %", "train s", "folder"], body)
        + ["", "</details>", ""]
    )


def write_report(out: str | Path) -> Path:
    """Write ``REPRODUCTION.md`` and ``plots/*.png`` in ``out`` from what the study folder holds; returns the path."""
    out = Path(out)
    data = collect(out)
    study = data["study"]
    invocations = study.get("invocations", [])
    total = sum(i["seconds"] for i in invocations)
    profile = study.get("profile", "?")
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
    ]
    body = []
    for i in invocations:
        state = "" if i.get("finished", True) else " (interrupted or running)"
        if i.get("gate_failed"):
            state = " (stopped by a gate)"
        body.append([f"`{i['command'] or '(API)'}`", i["started"], _short_commit(i.get("commit")),
                     _duration(i["seconds"]) + state])  # fmt: skip
    lines += _table(["command", "started (UTC)", "code (git commit)", "wall time"], body)
    lines += ["", f"Total wall time of the invocations: **{_duration(total)}**.", ""]
    lines += ["## Environment", "", *_environment(), ""]
    if data["plan"]:
        lines += ["## Protocol", "", *_protocol(data), ""]
        lines += ["## Gates (checked on validation before any distilled student trained)", "", *_gates(data)]
        lines += ["## Hyper-parameters chosen on validation (seed 0)", "", *_selection(data)]
        chosen = ", ".join(f"{k} {v:g}" for k, v in data["hp"].items())
        lines += [
            "## Results: test top-1",
            "",
            f"Chosen on validation: {chosen or '—'}. Mean ± sample std over seeds; Δ is the mean per-seed difference "
            "row − baseline in points, ± its standard error, with the two-sided paired t-test's p (n − 1 degrees "
            "of freedom). The teacher-head column is the frozen teacher head (for SH-KD: its student-aware "
            "teacher's head θ_s) applied to the student's embedding.",
            "",
            *_results(data),
        ]
        lines += [
            "## Convergence: validation gain over the last epochs",
            "",
            f"Final validation top-1 minus the value {data['plan']['gates']['flat_fraction']:.0%} of the epochs "
            "earlier, per run (flat: small against the differences between rows).",
            "",
            *_convergence(data),
        ]
        lines_ = table_rows(data["rows"])
        plots = out / "plots"
        if any(values for _, _, values in lines_):
            teacher = data["teacher"]["test"]["top1"] if data["teacher"] else None
            _plot_test(lines_, teacher, plots / "test.png")
            _plot_curves(data, plots / "curves.png")
            lines += ["![test top-1](plots/test.png)", "", "![validation curves](plots/curves.png)", ""]
        lines += _cells(out, data)
    with atomic_path(out / REPORT_NAME) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return out / REPORT_NAME
