"""``edgekd compare RUN_A RUN_B``: two runs side by side: the settings that differ, the last logged loss terms of each
model trained, and every verification metric with its 95 % interval, each with the difference B − A.

Each folder is read as its report reads it (``edgekd.distill.run_report.run_summary``: settings.json, results.json,
each metrics.jsonl, and report.json for AUC and EER). ``--out FILE.md`` also writes the comparison as Markdown.
"""

from __future__ import annotations

from pathlib import Path

import click

from edgekd.atomic import atomic_path
from edgekd.distill.run_report import (
    Section,
    Table,
    Text,
    fraction,
    number,
    run_summary,
    setting_text,
    to_markdown,
    to_text,
)
from edgekd.eval.report import value_ci
from edgekd.losses.terms import TERM_NAMES
from edgekd.utils.out_paths import check_output_file

# Where each run was written differs between any two runs; the header names both folders instead.
NOT_COMPARED = ("out",)
LOSS_KEYS = ("step", "loss", *TERM_NAMES, "lr")
UNITS = (
    "Accuracy, TAR, top-1 and EER in %, with [low, high] 95 % intervals where the run has them, and B - A in points; "
    "AUC and its B - A as fractions."
)


def _runs_section(a: dict, b: dict) -> Section:
    def line(name: str, run: dict) -> Text:
        method = f", method {run['method']}" if run.get("method") else ""
        return Text(f"{name}: {run['folder']} ({run['command']}{method}; edgekd {run.get('edgekd')})")

    return Section("Runs", [line("A", a), line("B", b)])


def settings_section(a: dict, b: dict) -> Section:
    """The settings whose values differ (a setting one run lacks shows as a dash)."""
    sa, sb = a["settings"], b["settings"]
    keys = [k for k in sorted(sa.keys() | sb.keys()) if k not in NOT_COMPARED]
    differ = [k for k in keys if sa.get(k) != sb.get(k)]
    shown = lambda s, k: "-" if s.get(k) is None else setting_text(s[k])  # noqa: E731
    blocks: list = [Table(["setting", "A", "B"], [[k, shown(sa, k), shown(sb, k)] for k in differ])] if differ else []
    blocks.append(Text(f"{len(keys) - len(differ)} other settings are the same" if differ else "No setting differs."))
    return Section("Settings that differ", blocks)


def _difference(va, vb, scale: float = 1.0, digits: str = ".6g") -> str:
    if not isinstance(va, int | float) or not isinstance(vb, int | float):
        return ""
    return f"{scale * (vb - va):+{digits}}"


def losses_section(a: dict, b: dict) -> Section:
    """The last logged step of each model trained, term by term."""
    rows = []
    for run in dict.fromkeys([*a["losses"], *b["losses"]]):
        la, lb = a["losses"].get(run, {}), b["losses"].get(run, {})
        for key in (k for k in LOSS_KEYS if k in la or k in lb):
            rows.append([run, key, number(la.get(key)), number(lb.get(key)), _difference(la.get(key), lb.get(key))])
    if not rows:
        return Section("Final losses", [Text("Neither run logged a loss.")])
    note = Text("The last logged step of each model trained (terms unweighted; loss is the weighted sum).")
    return Section("Final losses", [note, Table(["run", "term", "A", "B", "B - A"], rows)])


def metric_values(run: dict) -> dict[tuple[str, str], dict]:
    """``{(pairs, role): {"model": name, metric: (value, interval or None)}}``: the accuracy and each TAR@FAR with
    its interval, top-1 of classification runs, and AUC and EER from the run's report."""
    found: dict[tuple[str, str], dict] = {}
    for row in run["results"]:
        metrics = found.setdefault((row.get("pairs", "-"), row["role"]), {"model": row.get("model")})
        if "acc" in row:
            metrics["acc"] = (row["acc"], row.get("acc_ci"))
        for key in (k for k in row if k.startswith("tar@")):
            metrics[key] = (row[key], row.get("tar_ci", {}).get(key))
        if "top1" in row:
            metrics["top1"] = (row["top1"], None)
    for measure in run["roc"]:
        metrics = found.setdefault((measure["pairs"], measure["role"]), {"model": measure.get("model")})
        metrics["auc"], metrics["eer"] = (measure["auc"], None), (measure["eer"], None)
    return found


def _metric_cell(metric: str, value) -> str:
    if value is None or value[0] is None:
        return "-"
    return fraction(value[0]) if metric == "auc" else value_ci(value[0], value[1])


def verification_section(a: dict, b: dict) -> Section | None:
    """Each metric of each pair set and model, A, B and B − A; None when neither run was evaluated."""
    ma, mb = metric_values(a), metric_values(b)
    rows = []
    for key in dict.fromkeys([*ma, *mb]):
        va, vb = ma.get(key, {}), mb.get(key, {})
        models = dict.fromkeys(m for m in (va.get("model"), vb.get("model")) if m)
        label = f"{key[1]} ({' / '.join(models)})" if models else key[1]
        for metric in (m for m in dict.fromkeys([*va, *vb]) if m != "model"):
            x, y = va.get(metric), vb.get(metric)
            diff = ""
            if x is not None and y is not None:
                diff = _difference(x[0], y[0], 1.0, ".4f") if metric == "auc" else _difference(x[0], y[0], 100, ".2f")
            rows.append([key[0], label, metric, _metric_cell(metric, x), _metric_cell(metric, y), diff])
    if not rows:
        return None
    return Section("Verification", [Text(UNITS), Table(["pairs", "model", "metric", "A", "B", "B - A"], rows)])


def compare_sections(a: dict, b: dict) -> list[Section]:
    """The comparison of two run summaries (``run_summary``)."""
    sections = [_runs_section(a, b), settings_section(a, b), losses_section(a, b), verification_section(a, b)]
    return [s for s in sections if s is not None]


@click.command("compare")
@click.argument("run_a", type=click.Path(path_type=Path))
@click.argument("run_b", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_file",
    type=click.Path(path_type=Path),
    metavar="FILE.md",
    default=None,
    help="also write the comparison to this Markdown file (.md)",
)
def command(run_a: Path, run_b: Path, out_file: Path | None) -> None:
    """Compare two runs (the --out folders of edgekd distill or teacher) side by side: the settings that differ,
    the final losses, and each verification metric with its interval, with the difference B - A."""
    if out_file is not None:
        check_output_file(out_file, ".md")  # before reading the runs: a bad path fails first
    a, b = run_summary(run_a), run_summary(run_b)
    title = f"edgekd compare: A {a['folder']}, B {b['folder']}"
    sections = compare_sections(a, b)
    click.echo(to_text(title, sections), nl=False)
    if out_file is not None:
        with atomic_path(out_file) as tmp:
            tmp.write_text(to_markdown(title, sections, out_file.parent), encoding="utf-8")
        click.echo(f"wrote {out_file}")
