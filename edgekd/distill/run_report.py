"""A run that explains itself: ``OUT/report.md`` and ``OUT/report.html``, written when ``edgekd distill`` or
``edgekd teacher`` ends, and ``OUT/report.json``, the summary behind them that ``edgekd compare`` reads.

Everything in a report is read from the run folder's own files: the settings (``settings.json``), the last logged loss
terms of every model the run trained (each ``metrics.jsonl``) and their curves (``loss.png``), the verification table
as the run printed it and the ROC (``results.json``, ``roc.png``), the best model kept by ``--eval-every``
(``best.json``), and, where the folder holds them, the gates of exported artifacts (each sidecar
``<artifact>.json``) and latency (the JSON of ``edgekd benchmark-latency --json``). Two things exist only at the end of
a run and are kept in ``report.json`` for later readers: the ROC curves, as their AUC and EER, and the printed table.
So ``write_run_report(out)`` called again later (after an export into the folder) keeps them and adds what is new.

The HTML is one file that needs nothing else: images inlined as base64 PNG, no script, no link to fetch. Every file
is written atomically. The module sits in ``edgekd.distill`` (not ``edgekd.eval``) because it reads the training and
export layers, which ``edgekd.eval`` lies below.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from edgekd.atomic import atomic_path, write_json
from edgekd.errors import EdgekdError, EdgekdWarning
from edgekd.eval.metrics import equal_error_rate, roc_auc
from edgekd.eval.report import format_table
from edgekd.formats import check_format, read_versioned_json
from edgekd.losses.terms import TERM_NAMES
from edgekd.train.checkpoint import CHECKPOINT_NAME
from edgekd.train.curves import plot_loss_curves, read_metrics
from edgekd.train.verification import BEST_FILE, BEST_RECORD

__all__ = [
    "REPORT_JSON",
    "REPORT_MD",
    "REPORT_HTML",
    "Table",
    "Text",
    "Code",
    "Image",
    "Section",
    "run_summary",
    "roc_measures",
    "write_run_report",
    "report_sections",
    "to_text",
    "to_markdown",
    "to_html",
]

# edgekd.cli.options.SETTINGS_FILE: the command line, which writes it, sits above this package.
SETTINGS_NAME = "settings.json"
RESULTS_NAME = "results.json"
REPORT_JSON, REPORT_MD, REPORT_HTML = "report.json", "report.md", "report.html"
LOSS_PLOT, ROC_PLOT = "loss.png", "roc.png"
LATENCY_TOOL = "edgekd benchmark-latency"  # the ``tool`` field of the JSON that command writes
WHAT_TO_PASS = "pass the --out folder of an `edgekd distill` or `edgekd teacher` run"


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Text:
    text: str


@dataclass
class Code:
    """Text as the terminal showed it (aligned tables, gate reports): kept verbatim in a fixed-width block."""

    text: str


@dataclass
class Image:
    path: Path
    caption: str


@dataclass
class Section:
    title: str
    blocks: list[Table | Text | Code | Image]


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; {} when there is no such file; a one-line error when it is not JSON."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgekdError(f"cannot read {path}: {str(exc).splitlines()[0]}; write it again with edgekd") from None
    if not isinstance(data, dict):
        raise EdgekdError(f"{path} holds no JSON object; write it again with edgekd")
    return data


def _run_settings(out: Path) -> dict:
    """The run's ``settings.json`` (command, edgekd version, settings); a one-line error for a folder with none."""
    if not out.is_dir():
        raise EdgekdError(f"{out} is not a folder; {WHAT_TO_PASS}")
    path = out / SETTINGS_NAME
    if not path.is_file():
        raise EdgekdError(f"{out} is not an edgekd run folder (it has no {SETTINGS_NAME}); {WHAT_TO_PASS}")
    return read_versioned_json("settings", path)


def _json_files(out: Path) -> list[Path]:
    """The JSON files under ``out``, outside checkpoint folders and hidden (temporary) names, in a stable order."""
    found = []
    for folder, dirs, files in os.walk(out):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not CHECKPOINT_NAME.fullmatch(d))
        found += [Path(folder) / name for name in sorted(files) if name.endswith(".json") and not name.startswith(".")]
    return found


def training_runs(out: Path, command: str, teacher: str | None = None) -> dict[str, Path]:
    """``{name: metrics.jsonl}`` of every model the run trained: each under ``out`` named by its folder (``student``,
    ``sh_kd/i1``; the run folder itself by ``command``), and the teacher trained for it elsewhere (the cache)."""
    runs: dict[str, Path] = {}
    for path in sorted(out.rglob("metrics.jsonl")):
        if any(part.startswith(".") for part in path.relative_to(out).parts):
            continue  # a folder on its way out (atomic.discard_tree)
        name = path.parent.relative_to(out).as_posix()
        runs[command if name == "." else name] = path
    if teacher:
        outside = Path(teacher).parent / "metrics.jsonl"
        if outside.is_file() and outside.resolve() not in {p.resolve() for p in runs.values()}:
            runs["teacher"] = outside
    return runs


def _final_losses(runs: dict[str, Path]) -> dict[str, dict]:
    """The last loss line of each run: ``step``, ``loss``, its logged terms and ``lr``."""
    keep = ("step", "loss", *TERM_NAMES, "lr")
    losses = {}
    for name, path in runs.items():
        lines = [row for row in read_metrics(path) if "loss" in row]  # verification lines carry scores instead
        if lines:
            losses[name] = {k: lines[-1][k] for k in keep if k in lines[-1]}
    return losses


def _best_during_training(runs: dict[str, Path]) -> dict[str, dict]:
    """``best.json`` beside each run's metrics: the step and scores of the model ``--eval-every`` kept."""
    return {
        name: _read_json(path.parent / BEST_RECORD)
        for name, path in runs.items()
        if (path.parent / BEST_RECORD).is_file()
    }


def _exports_and_latency(out: Path) -> tuple[list[dict], list[dict]]:
    """Export sidecars (``X.json`` beside the artifact ``X`` it names, with its gate report) and ``benchmark-latency``
    JSON under ``out``, each with its path relative to ``out``; other JSON files are the user's and left alone."""
    exports, latency = [], []
    for path in _json_files(out):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict):
            continue
        relative = path.relative_to(out).as_posix()
        artifact = path.with_name(path.name.removesuffix(".json"))
        if data.get("artifact") == artifact.name and isinstance(data.get("gate"), dict) and artifact.is_file():
            check_format("export_sidecar", data, path)
            exports.append({"sidecar": relative, **data})
        elif data.get("tool") == LATENCY_TOOL:
            latency.append({"path": relative, **data})
    return exports, latency


def run_summary(out: str | os.PathLike) -> dict:
    """What the report of the run in ``out`` shows, read from the folder's files (see the module doc). A folder that
    holds no run (no ``settings.json``) is a one-line error naming it."""
    out = Path(out)
    saved = _run_settings(out)
    results = _read_json(out / RESULTS_NAME)
    kept = _read_json(out / REPORT_JSON)  # what only the end of the run knew: AUC and EER, the printed table
    runs = training_runs(out, saved.get("command", "run"), results.get("teacher"))
    exports, latency = _exports_and_latency(out)
    return {
        "folder": str(out.resolve()),
        "command": saved.get("command"),
        "edgekd": saved.get("edgekd"),
        "settings": saved.get("settings", {}),
        **{key: results[key] for key in ("method", "student", "teacher", "seconds") if key in results},
        "losses": _final_losses(runs),
        "best": _best_during_training(runs),
        "results": results.get("results", []),
        "roc": kept.get("roc", []),
        "table": kept.get("table", ""),
        "exports": exports,
        "latency": latency,
    }


def _auc_eer(fpr, tpr) -> tuple[float | None, float | None]:
    """AUC and EER of one ROC; None for a pair set without both genuine and impostor pairs (its rates are NaN)."""
    if any(math.isnan(float(v)) for v in (*fpr, *tpr)):
        return None, None
    return roc_auc(fpr, tpr), equal_error_rate(fpr, tpr)


def roc_measures(rows: list[dict], curves: dict) -> list[dict]:
    """AUC and EER per verification row (``pairs``, ``role``, ``model``), from the ROC curves the run drew:
    ``{label: (fpr, tpr)}``, one per pair set and model in the order of the rows (``edgekd.distill.run`` makes each
    row with its curve)."""
    verified = [row for row in rows if "pairs" in row]
    measures = []
    for row, (label, (fpr, tpr)) in zip(verified, curves.items(), strict=True):
        auc, eer = _auc_eer(fpr, tpr)
        measures.append({"pairs": row["pairs"], "role": row["role"], "model": row["model"], "curve": label,
                         "auc": auc, "eer": eer})  # fmt: skip
    return measures


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_run_report(out: str | os.PathLike, curves: dict | None = None, table: str = "") -> Path:
    """Write ``report.json``, ``report.md`` and ``report.html`` into the run folder ``out``; returns the HTML's path.

    Args:
        out: the run folder (``--out``).
        curves: the ROC curves the run drew, ``{label: (fpr, tpr)}`` in the order of its verification rows (see
            ``roc_measures``); None keeps the AUC and EER of an earlier report.
        table: the results table the run printed; empty keeps an earlier report's.
    """
    out = Path(out)
    summary = run_summary(out)
    if curves:
        summary["roc"] = roc_measures(summary["results"], curves)
    if table:
        summary["table"] = table
    if summary["losses"] and not (out / LOSS_PLOT).is_file():  # a teacher run draws none of its own
        runs = training_runs(out, summary["command"], summary.get("teacher"))
        plot_loss_curves({name: runs[name] for name in summary["losses"]}, out / LOSS_PLOT)
    write_json(out / REPORT_JSON, summary)
    title = f"edgekd {summary['command']} run: {summary['folder']}"
    sections = report_sections(summary, out)
    _write_text(out / REPORT_MD, to_markdown(title, sections, out))
    _write_text(out / REPORT_HTML, to_html(title, sections))
    return out / REPORT_HTML


# -- the sections of a report -------------------------------------------------------------------------------------


def setting_text(value) -> str:
    """A setting as the settings line shows it (lists and mappings as JSON)."""
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def number(value) -> str:
    """A logged value: floats to 6 significant digits, a missing one as a dash."""
    if value is None:
        return "-"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def loss_table(losses: dict[str, dict]) -> Table:
    """One row per trained model: the step of its last loss line, the weighted total, each term (unweighted), lr."""
    terms = [t for t in TERM_NAMES if any(t in row for row in losses.values())]
    columns = ["step", "loss", *terms, "lr"]
    rows = [[name, *(number(row.get(k)) for k in columns)] for name, row in losses.items()]
    return Table(["run", *columns], rows)


def _header(summary: dict) -> Text:
    facts = [f"edgekd {summary.get('edgekd')}"]
    if summary.get("method"):
        facts.append(f"method {summary['method']}")
    if summary.get("seconds") is not None:
        facts.append(f"{summary['seconds']:.0f} s")
    for role in ("student", "teacher"):
        if summary.get(role):
            facts.append(f"{role}: {summary[role]}")
    return Text("; ".join(facts))


def _settings_section(summary: dict) -> Section:
    shown = {k: v for k, v in summary["settings"].items() if v is not None}
    note = Text(
        f"From {SETTINGS_NAME}; settings left unset (their defaults apply) are left out, as in the settings line."
    )
    return Section("Settings", [Table(["setting", "value"], [[k, setting_text(v)] for k, v in shown.items()]), note])


def _training_section(summary: dict, out: Path) -> Section:
    blocks: list = []
    if summary["losses"]:
        blocks.append(Text("The last logged step of each model trained (terms unweighted; loss is the weighted sum):"))
        blocks.append(loss_table(summary["losses"]))
    else:
        blocks.append(Text("No loss was logged."))
    if (out / LOSS_PLOT).is_file():
        blocks.append(Image(out / LOSS_PLOT, "Training losses by step"))
    for name, best in summary["best"].items():
        scores = ", ".join(f"{k} {100 * v:.2f} %" for k, v in best.get("accuracy", {}).items())
        blocks.append(Text(f"Best {name} by verification during training (--eval-every): step {best.get('step')}, "
                           f"{scores} ({BEST_RECORD}, {BEST_FILE})"))  # fmt: skip
    return Section("Training", blocks)


def pair_sets(rows: list[dict]) -> str:
    """The pair sets of verification rows with their impostor counts: ``lfw (3000 impostor pairs), cfp_fp (...)``."""
    sets = {row["pairs"]: row.get("impostor_pairs") for row in rows if "pairs" in row}
    return ", ".join(f"{name} ({n} impostor pairs)" if n is not None else name for name, n in sets.items())


def roc_table(measures: list[dict]) -> Table:
    """AUC and EER per pair set and model."""
    rows = [[m["pairs"], f"{m['role']} ({m['model']})", fraction(m["auc"]), percent(m["eer"])] for m in measures]
    return Table(["pairs", "model", "AUC", "EER %"], rows)


def _verification_section(summary: dict, out: Path) -> Section | None:
    if not summary["results"]:
        return None
    verified = any("pairs" in row for row in summary["results"])
    blocks: list = [Text(f"Pair sets: {pair_sets(summary['results'])}.")] if verified else []
    if summary["table"]:
        blocks.append(Code(summary["table"]))
    if summary["roc"]:
        blocks.append(Text("ROC: area under the curve (AUC) and equal error rate (EER: the FAR at which FAR = 1 - TAR, "
                           "on the curve drawn straight between its points)."))  # fmt: skip
        blocks.append(roc_table(summary["roc"]))
    if (out / ROC_PLOT).is_file():
        blocks.append(Image(out / ROC_PLOT, f"ROC (TAR against FAR, log axis) on {pair_sets(summary['results'])}"))
    return Section("Verification" if verified else "Results", blocks)


def gate_text(gate: dict) -> str:
    """A sidecar's gate report as ``edgekd export`` printed it (``GateReport.format``)."""
    # Only for a folder that holds exports: the export layer (onnx, runtimes) loads late.
    from edgekd.export.checks.gates import GateReport, ParityRow, TaskResult

    def build(cls, record: dict):
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})

    report = build(GateReport, gate)
    report.rows = [build(ParityRow, row) for row in gate.get("rows", [])]
    report.task = build(TaskResult, gate["task"]) if gate.get("task") else None
    return report.format()


def _exports_section(exports: list[dict]) -> Section:
    blocks: list = []
    for sidecar in exports:
        verdict = "passed" if sidecar["gate"].get("passed") else "FAILED"
        blocks.append(Text(f"{sidecar.get('artifact')} ({sidecar.get('kind')}, {sidecar.get('precision')}): gates "
                           f"{verdict} ({sidecar['sidecar']})"))  # fmt: skip
        blocks.append(Code(gate_text(sidecar["gate"])))
    return Section("Export gates", blocks)


def _latency_section(latency: list[dict], out: Path) -> Section:
    # Only for a folder that holds latency results: the export layer (onnx, runtimes) loads late.
    from edgekd.export.latency import format_latency_table

    blocks: list = []
    for report in latency:
        env = report.get("environment", {})
        where = env.get("gpu") or env.get("cpu") or "unknown device"
        blocks.append(
            Text(f"{report['path']}: {where}, {env.get('benchmark_threads')} threads, {report.get('created')}")
        )
        blocks.append(Code(format_latency_table(report.get("results", []))))
        plot = out / Path(report["path"]).with_suffix(".png")  # benchmark-latency's plot, unless --plot moved it
        if plot.is_file():
            blocks.append(Image(plot, f"Latency and throughput by batch size ({report['path']})"))
    return Section("Latency", blocks)


def report_sections(summary: dict, out: Path) -> list[Section]:
    """The report of ``summary`` (``run_summary``): the run, its settings, training and verification, and the export
    gates and latency where the folder holds them."""
    sections = [Section("Run", [_header(summary)]), _settings_section(summary), _training_section(summary, out)]
    sections.append(_verification_section(summary, out))
    sections.append(_exports_section(summary["exports"]) if summary["exports"] else None)
    sections.append(_latency_section(summary["latency"], out) if summary["latency"] else None)
    return [s for s in sections if s is not None]


# -- rendering ----------------------------------------------------------------------------------------------------


def to_text(title: str, sections: list[Section]) -> str:
    """Plain text for a terminal: tables aligned (``format_table``), images left out."""
    lines = [title]
    for section in sections:
        lines += ["", section.title]
        for block in section.blocks:
            if isinstance(block, Table):
                keyed = [dict(enumerate(row)) for row in block.rows]
                lines.append(format_table(keyed, list(enumerate(block.headers))))
            elif isinstance(block, Text | Code):
                lines.append(block.text)
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, sections: list[Section], folder: Path) -> str:
    """Markdown; images are linked relative to ``folder``, where the document is written."""
    lines = [f"# {title}"]
    for section in sections:
        lines += ["", f"## {section.title}"]
        for block in section.blocks:
            lines.append("")
            if isinstance(block, Table):
                lines.append("| " + " | ".join(map(_md_cell, block.headers)) + " |")
                lines.append("|" + "|".join("---" for _ in block.headers) + "|")
                lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
            elif isinstance(block, Code):
                lines += ["```text", block.text, "```"]
            elif isinstance(block, Image):
                lines.append(f"![{block.caption}]({Path(os.path.relpath(block.path, folder)).as_posix()})")
            else:
                lines.append(block.text)
    return "\n".join(lines) + "\n"


_STYLE = (
    "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #bbb;padding:.2em .6em;text-align:left}"
    "th{background:#eee}pre{background:#f6f6f6;padding:.6em;overflow-x:auto}img{max-width:100%}"
)


def to_html(title: str, sections: list[Section]) -> str:
    """One self-contained HTML page: images inlined as base64 PNG, no script, nothing fetched."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{esc(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Table):
                head = "".join(f"<th>{esc(h)}</th>" for h in block.headers)
                body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif isinstance(block, Code):
                parts.append(f"<pre>{esc(block.text)}</pre>")
            elif isinstance(block, Image):
                data = base64.b64encode(block.path.read_bytes()).decode("ascii")
                parts.append(f'<figure><img alt="{esc(block.caption)}" src="data:image/png;base64,{data}">'
                             f"<figcaption>{esc(block.caption)}</figcaption></figure>")  # fmt: skip
            else:
                parts.append(f"<p>{esc(block.text)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# How far above an output its run folder may be: OUT/sh_kd/i2/student.fp32.onnx, beside SH-KD's last stage, reaches OUT.
RUN_FOLDER_LEVELS = 3


def enclosing_run(path: str | os.PathLike) -> Path | None:
    """The run folder an output was written into: the nearest of the output's folder and the two above it that holds
    a finished run's ``settings.json`` and ``report.json`` (``edgekd distill`` or ``edgekd teacher``); None if none."""
    for folder in Path(os.path.abspath(path)).parents[:RUN_FOLDER_LEVELS]:
        if (folder / SETTINGS_NAME).is_file() and (folder / REPORT_JSON).is_file():
            return folder
    return None


def update_run_report(path: str | os.PathLike, log: Callable[[str], None]) -> None:
    """Write again the report of the run folder ``path`` (an export or latency result) was written into, so that it
    shows the new file, and say so through ``log``; nothing for an output outside a run folder. The output is made by
    then: a report that cannot be written is a warning, not the command's failure."""
    run = enclosing_run(path)
    if run is None:
        return
    try:
        log(f"run report updated: {write_run_report(run)}")
    except EdgekdError as exc:
        warnings.warn(f"the run report of {run} was not updated: {exc}", EdgekdWarning, stacklevel=2)
