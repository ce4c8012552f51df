"""The study's report, read back from the run folder: ``REPRODUCTION.md`` (tables of mean ± std over seeds, the
selection on the validation split, the exact commands, versions and wall time) and PNG plots (a bar chart with
error bars and the training curves of each dataset).

Everything here reads only the files the runner wrote (``study.json``, ``selection.json``, each cell's
``result.json`` / ``test.json`` / ``metrics.jsonl``), so ``edgekd study --report-only`` redraws a report without
training, and a half-finished study reports the cells it has.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import numpy as np

from edgekd.atomic import atomic_path
from edgekd.utils.env import environment

__all__ = ["collect", "write_report", "mean_std", "format_weights"]

REPORT_NAME = "REPRODUCTION.md"
_TERMS = ("ce", "kd", "th_ce", "th_kd", "l2e")
# (key in the metrics dict, column header) per task; values are fractions, shown as percentages.
_COLUMNS = {
    False: [("top1", "test top-1 %")],
    True: [("accuracy", "10-fold acc %"), ("tar@0.001", "TAR@FAR=1e-3 %"), ("tar@0.0001", "TAR@FAR=1e-4 %")],
}


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; NaN for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else math.nan


def _pm(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{scale * mean:.2f} ± {'n/a' if math.isnan(std) else f'{scale * std:.2f}'}"


def format_weights(weights: dict) -> str:
    """``ce 1, kd 1.5, th_kd 0.02, T 4``: the non-zero terms, and T when a KL term is on."""
    items = [f"{k} {weights[k]:g}" for k in _TERMS if weights.get(k)]
    if weights.get("kd") or weights.get("th_kd"):
        items.append(f"T {weights['T']:g}")
    return ", ".join(items)


def _row_folder(row_key: str) -> str:
    return "teacher" if row_key == "teacher" else row_key.replace("/", "_")


def collect(out: str | Path) -> dict:
    """Every finished cell under ``out``, grouped: ``{dataset: {"plan", "selection", "rows": {row: [cells]}}}``.

    Each cell is its result.json plus ``test`` (and ``student_aware_teacher``) from test.json and ``folder``; only a
    row's chosen variant has a test.json, so those are the cells that enter the tables.
    """
    out = Path(out)
    study = _read(out / "study.json") or {}
    grouped: dict = {}
    for plan in study.get("plan", {}).get("datasets", []):
        name = plan["name"]
        base = out / name
        selection = _read(base / "selection.json") or {}
        rows: dict[str, list[dict]] = {}
        for row in plan["rows"]:
            cells = []
            for seed_dir in sorted(base.glob("seed*"), key=lambda p: int(p.name[4:] or 0)):
                folder = seed_dir / _row_folder(row["key"])
                if row["key"] != "teacher":
                    folder = folder / selection.get(row["key"], {}).get("chosen", row["variants"][0]["label"])
                result, test = _read(folder / "result.json"), _read(folder / "test.json")
                if result is None or test is None or test.get("key") != result.get("key"):
                    continue
                cells.append({**result, **test, "folder": folder})
            rows[row["key"]] = cells
        grouped[name] = {"plan": plan, "selection": selection, "rows": rows}
    return grouped


# --------------------------------------------------------------------------------------------- plots


def _plot_metrics(name: str, face: bool, rows: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = _COLUMNS[face]
    keys = [k for k, cells in rows.items() if cells]
    fig, axes = plt.subplots(
        1, len(columns), figsize=(max(6.0, 0.9 * len(keys)) * len(columns) ** 0.5 + 2, 4.2), squeeze=False
    )
    x = np.arange(len(keys))
    for ax, (metric, header) in zip(axes[0], columns, strict=True):
        values = [[100 * c["test"][metric] for c in rows[k]] for k in keys]
        means = [float(np.mean(v)) for v in values]
        stds = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in values]
        colors = [_color(i, k) for i, k in enumerate(keys)]
        ax.bar(x, means, yerr=stds, capsize=4, color=colors, alpha=0.85)
        for i, v in enumerate(values):
            ax.scatter(np.full(len(v), x[i]) + np.linspace(-0.15, 0.15, len(v)), v, s=10, color="k", zorder=3)
        low = min(min(v) for v in values)
        high = max(max(v) for v in values)
        pad = max(0.5, 0.15 * (high - low))
        ax.set_ylim(max(0.0, low - pad), min(100.0, high + pad))
        ax.set_xticks(x, keys, rotation=35, ha="right")
        ax.set_ylabel(header)
        ax.grid(axis="y", alpha=0.3)
    n = max(len(v) for v in rows.values())
    fig.suptitle(f"{name}: test, mean ± std over {n} seed(s) (dots: single seeds)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _color(index: int, key: str) -> str:
    """Grey for the teacher; the tab10 colours without their grey (C7) for the rest."""
    return "0.45" if key == "teacher" else f"C{[0, 1, 2, 3, 4, 5, 6, 8, 9][index % 9]}"


def _curve(cell: dict) -> dict[str, np.ndarray]:
    path = Path(cell["folder"]) / cell["metrics"]
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keys = {k for line in lines for k in line}
    return {k: np.array([line.get(k, np.nan) for line in lines], dtype=np.float64) for k in keys}


def _plot_curves(name: str, rows: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (key, cells) in enumerate(rows.items()):
        curves = [c for c in map(_curve, cells) if "step" in c]
        if not curves:
            continue
        length = min(len(c["step"]) for c in curves)
        epochs = curves[0]["step"][:length] * cells[0]["batch_size"] / cells[0]["train_images"]
        for ax, term in zip(axes, ("loss", "ce"), strict=True):
            stack = np.stack([c.get(term, np.full(length, np.nan))[:length] for c in curves])
            if np.isnan(stack).all():
                continue
            ax.plot(
                epochs,
                np.nanmean(stack, axis=0),
                label=key,
                color=_color(i, key),
                linestyle="--" if key == "teacher" else "-",
                marker="o" if length < 15 else None,
                markersize=3,
            )
    axes[0].set_title("total training loss (weighted terms)")
    axes[1].set_title("ce: cross-entropy of the model's own head")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{name}: training curves, mean over seeds (training batches, as logged)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


# --------------------------------------------------------------------------------------------- markdown


def _environment() -> list[str]:
    env = environment()
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    threads = env.get("threads", {})
    lines = [
        f"- versions: {versions}",
        f"- platform: {env.get('platform', platform.platform())}",
        f"- CPU: {env.get('cpu')}; GPU: {(env.get('gpu') or {}).get('name', 'none')}",
        f"- threads: torch {threads.get('torch_threads')}, usable CPUs {threads.get('usable_cpus')}",
    ]
    return lines


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(cells) + " |" for cells in body
    ]


def _protocol(plan: dict) -> list[str]:
    t, s = plan["teacher"], plan["student"]
    face = plan["head"] != "linear"
    lines = [
        f"- data `{plan['data']}`" + (f", image size {plan['image_size']}" if plan["image_size"] else ""),
        f"- teacher `{t['model']}`: {t['epochs']:g} epochs, lr {t['lr']:g}, batch {t['batch_size']}; "
        f"student `{s['model']}`: {s['epochs']:g} epochs, lr {s['lr']:g}, batch {s['batch_size']}; SGD momentum "
        f"0.9, weight decay {plan['weight_decay']:g}, {plan['warmup_steps']} warm-up steps then linear decay "
        "(fixed by the profile, not tuned: validation selects only among each row's weight variants)",
    ]
    if face:
        (vi, vn), (ti, tn) = plan["verify_val"], plan["verify_test"]
        lines += [
            f"- head {plan['head']} (s = {plan['scale']:g}, m = {plan['margin']}); test: all pairs of {ti} held-out "
            f"identities × {tn} images (TAR@FAR from every genuine/impostor pair; 10-fold accuracy on all genuine "
            f"pairs and as many impostors), flip-summed embeddings",
            f"- validation (selection by TAR@FAR=1e-3): {vi} other held-out identities × {vn} images "
            "(data seed + 1), disjoint from the test identities",
        ]
    else:
        limit = f" (first {plan['eval_limit']} images)" if plan.get("eval_limit") else ""
        lines += [
            f"- linear head; test: the official test split{limit}; validation (selection by top-1): the seeded "
            "5,000-image split carved from the training set, which the models never train on",
        ]
    return lines


def write_report(out: str | Path) -> Path:
    """Write ``REPRODUCTION.md`` and ``plots/*.png`` in ``out`` from what the study folder holds; returns the path."""
    out = Path(out)
    study = _read(out / "study.json") or {}
    grouped = collect(out)
    invocations = study.get("invocations", [])
    total = sum(i["seconds"] for i in invocations)
    profile = study.get("profile", "?")
    lines = [
        "# Reproduction: classifier-sharing KD (TH-KD, SH-KD) against KD and embedding distillation",
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
    body = [
        [
            f"`{i['command'] or '(API)'}`",
            i["started"],
            _duration(i["seconds"]) + ("" if i.get("finished", True) else " (interrupted or running)"),
        ]
        for i in invocations
    ]
    lines += _table(["command", "started (UTC)", "wall time"], body)
    cell_seconds = sum(
        c.get("train_seconds", 0) + c.get("eval_seconds", 0)
        for g in grouped.values()
        for cells in g["rows"].values()
        for c in cells
    )
    lines += [
        "",
        f"Total wall time of the invocations: **{_duration(total)}** "
        f"(train + validation time of the cells in the tables: {_duration(cell_seconds)}).",
        "",
    ]
    lines += ["## Environment", "", *_environment(), ""]
    for name, group in grouped.items():
        lines += _dataset_section(out, name, group)
    with atomic_path(out / REPORT_NAME) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return out / REPORT_NAME


def _duration(seconds: float | None) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {sec:02d} s"


def _dataset_section(out: Path, name: str, group: dict) -> list[str]:
    plan, rows, selection = group["plan"], group["rows"], group["selection"]
    face = plan["head"] != "linear"
    columns = _COLUMNS[face]
    title = "Synthetic identities: verification" if face else "Fashion-MNIST: classification"
    lines = [f"## {title} (`{name}`)", "", *_protocol(plan), ""]
    main_key, main_header = columns[1] if face else columns[0]  # the metric validation selects by
    vanilla = [c["test"][main_key] for c in rows.get("vanilla", [])]
    body = []
    for key, cells in rows.items():
        if not cells:
            body.append([key, "—", "—", "—", *("—" for _ in columns), "—", "0"])
            continue
        first = cells[0]
        main = [c["test"][main_key] for c in cells]
        delta = f"{100 * (np.mean(main) - np.mean(vanilla)):+.2f}" if vanilla and key != "vanilla" else "—"
        body.append(
            [
                key,
                format_weights(first["weights"]),
                "—" if key == "teacher" else first["variant"],
                f"{first['params']:,}",
                *(_pm([c["test"][m] for c in cells]) for m, _ in columns),
                delta,
                str(len(cells)),
            ]
        )
    header = ["row", "weights", "variant", "params", *(h for _, h in columns), f"Δ {main_header} vs vanilla", "seeds"]
    lines += [f"Test split, mean ± sample std over seeds ({'verification' if face else 'top-1'}):", ""]
    lines += _table(header, body) + [""]
    sh = [(k, c) for k, cells in rows.items() for c in cells if "student_aware_teacher" in c]
    if sh:
        lines += [
            "SH-KD's student-aware teacher (stage I1, trained on the temporary student's frozen head) against "
            "the plain teacher, on the test split:",
            "",
        ]
        teacher = rows.get("teacher", [])
        body = [
            ["plain (`teacher` row)", *(_pm([c["test"][m] for c in teacher]) for m, _ in columns)],
            [f"student-aware ({sh[0][0]})", *(_pm([c["student_aware_teacher"][m] for _, c in sh]) for m, _ in columns)],
        ]
        lines += _table(["teacher", *(h for _, h in columns)], body) + [""]
    if any(len(entry["scores"]) > 1 for entry in selection.values()):
        lines += [
            "Selection on the validation split, seed 0 (higher is better; each chosen variant then ran on "
            "every seed and was tested once):",
            "",
        ]
        body = []
        for row in plan["rows"]:
            entry = selection.get(row["key"])
            if entry is None or len(entry["scores"]) < 2:
                continue
            scores = ", ".join(f"{v['label']} {100 * entry['scores'][v['label']]:.2f}" for v in row["variants"])
            body.append([row["key"], entry["metric"], scores, entry["chosen"]])
        lines += _table(["row", "val metric", "variants (val %)", "chosen"], body) + [""]
    plots = out / "plots"
    done = {k: v for k, v in rows.items() if v}
    if done:
        _plot_metrics(name, face, done, plots / f"{name}_test.png")
        _plot_curves(name, done, plots / f"{name}_curves.png")
        lines += [
            f"![{name} test metrics](plots/{name}_test.png)",
            "",
            f"![{name} training curves](plots/{name}_curves.png)",
            "",
        ]
    body = []
    for key, cells in rows.items():
        for c in cells:
            body.append(
                [
                    key,
                    c["variant"],
                    str(c["seed"]),
                    *(f"{100 * c['test'][m]:.2f}" for m, _ in columns),
                    f"{100 * c['val'][columns[0][0] if not face else 'tar@0.001']:.2f}",
                    f"{c['train_seconds']:.0f}",
                    str(Path(c["folder"]).relative_to(out)),
                ]
            )
    lines += ["<details><summary>Every tested cell</summary>", ""]
    lines += _table(["row", "variant", "seed", *(h for _, h in columns), "val %", "train s", "folder"], body)
    lines += ["", "</details>", ""]
    return lines
