"""bench/gpu_check.py's outputs from the stage JSON files: the markdown section for BENCHMARKS.md and the one-screen
summary. Pure functions of the loaded JSON; the table helpers of the two benchmark scripts are imported lazily (they
import torch), so the orchestrating process stays free of torch until the very end."""

from __future__ import annotations

import json
from datetime import date

SECTION = "## GPU check"
STAGE_TITLES = {
    "environment": "environment",
    "gpu_tests": "GPU tests",
    "loss": "shared-head loss",
    "distill": "distillation step",
    "latency": "mbf latency",
}


def _fmt(value, spec: str = ".3f", empty: str = "") -> str:
    return empty if value is None else format(value, spec)


# ------------------------------------------------------------------------------------------------------- parts


def machine_line(env_stage: dict | None) -> str:
    """GPU (or CPU), driver and versions from the environment stage."""
    env = (env_stage or {}).get("environment")
    if not env:
        return "environment not recorded"
    # A stage cut short records only the fields it reached.
    v, gpu, smi = env.get("versions") or {}, env.get("gpu"), env.get("nvidia_smi") or {}
    where = f"{gpu['name']} ({gpu.get('multiprocessors', '?')} SMs, {gpu['memory_gib']} GiB)" if gpu else env.get("cpu")
    driver = f", driver {smi['driver_version']}" if smi.get("driver_version") else ""
    cuda = f", CUDA {gpu['cuda']}" if gpu else ""
    return (f"{where}{driver}{cuda}; torch {v.get('torch')}, triton {v.get('triton')}, onnxruntime "
            f"{v.get('onnxruntime')}, python {v.get('python')}, liger-kernel {env.get('liger_kernel')}")  # fmt: skip


def commit_text(env_stage: dict | None) -> str:
    """The tested commit (12 digits, ``+dirty`` kept) and where it was read when not from git (the stamp file)."""
    env = (env_stage or {}).get("environment") or {}
    commit, source = env.get("git_commit"), env.get("git_commit_source", "git")
    if not commit:
        return f"not recorded ({source})" if "git_commit_source" in env else "not recorded"
    return commit[:12] + commit[40:] + ("" if source == "git" else f" (from {source})")


def spreads(tests_stage: dict | None) -> list[dict]:
    """The determinism test's recorded spreads, one per dtype."""
    found = []
    for case in (tests_stage or {}).get("tests", []):
        if "spread" in case.get("properties", {}):
            found.append(json.loads(case["properties"]["spread"]))
    return found


def spread_text(entry: dict) -> str:
    parts = " ".join(f"{k} {v:.1e}" for k, v in entry["spread"].items())
    distinct = ", ".join(f"{k} {v}" for k, v in entry["distinct_results"].items())
    return f"{entry['dtype'].removeprefix('torch.')}: {parts} (distinct results of {entry['runs']}: {distinct})"


def tests_text(tests_stage: dict | None) -> str:
    counts = (tests_stage or {}).get("counts")
    if not counts:
        return "no results"
    running = len((tests_stage or {}).get("running", []))
    return ", ".join(f"{v} {k}" for k, v in counts.items()) + (f", {running} unfinished" if running else "")


def failed_tests(tests_stage: dict | None) -> list[str]:
    """Failed tests with their message, then those still running when the stage ended (killed, or hung)."""
    stage = tests_stage or {}
    failed = [f"{c['test']}: {c['message']}" for c in stage.get("tests", []) if c["outcome"] in ("failed", "error")]
    return failed + [f"{test}: unfinished when the stage ended" for test in stage.get("running", [])]


def loss_pivot(rows: list[dict]) -> tuple[list[str], list[tuple]]:
    """Providers in order and one (case, C, floor, {provider: row}) per configuration."""
    providers, configs = [], {}
    for r in rows:
        if r["provider"] != "*" and r["provider"] not in providers:
            providers.append(r["provider"])
        key = (r["case"], r["C"])
        configs.setdefault(key, {"floor": r.get("floor"), "rows": {}})["rows"][r["provider"]] = r
    return providers, [(case, C, v["floor"], v["rows"]) for (case, C), v in configs.items()]


def loss_cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row.get("median") is not None:
        return f"{row['median']:.3f}"
    note = row.get("note", "")
    return "n/a" if note.startswith(("not installed", "plain CE only", "GPU only")) else "failed"


def latency_pivot(rows: list[dict]) -> tuple[list[int], dict[str, dict[int, dict]]]:
    """Batches and ``{backend(+graph): {batch: row}}``."""
    batches, table = [], {}
    for r in rows:
        name = r["backend"] + ("+graph" if r.get("cuda_graph") else "")
        table.setdefault(name, {})[r["batch"]] = r
        if r["batch"] not in batches:
            batches.append(r["batch"])
    return sorted(batches), table


def latency_cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"].split(":")[0]
    return f"{row['latency_ms']['median']:.3f}"


# ---------------------------------------------------------------------------------------------------- markdown


def stage_table(summary: dict) -> list[str]:
    lines = ["| stage | status | wall s | budget s |", "|---|---|---:|---:|"]
    for stage, s in summary["stages"].items():
        lines.append(
            f"| {STAGE_TITLES[stage]} | {s['status']} | {_fmt(s.get('wall_s'), '.0f')} | {s['budget_s']:.0f} |"
        )
    return lines


def tests_section(stage: dict | None) -> list[str]:
    lines = ["### GPU tests", "", f"`{(stage or {}).get('command', 'pytest -m gpu')}`: {tests_text(stage)}."]
    failures = failed_tests(stage)
    if failures:
        lines += ["", "Failures:", *[f"- {f}" for f in failures[:20]]]
    found = spreads(stage)
    if found:
        lines += ["", "Atomics, the same inputs 20 times (triton backend, B=512, D=512, C=100,003, ArcFace, all four",
                  "terms): spread = max over runs of max|x_r − x_0| / max|x_0|.", ""]  # fmt: skip
        lines += [f"- {spread_text(e)}" for e in found]
    return lines + [""]


def loss_section(stage: dict | None) -> list[str]:
    from bench import shared_head_loss as shl

    stage = stage or {}
    cfg, rows = stage.get("config", {}), stage.get("rows", [])
    lines = [f"### Shared-head loss (B={cfg.get('loss_B')}, D={cfg.get('loss_D')})", "", *stage.get("method", []), ""]
    ceilings, spec = stage.get("ceilings"), stage.get("spec_ceilings")
    if ceilings:
        spec_text = f"; spec sheet {spec['tflops']:.0f} TFLOP/s, {spec['tbps']:.2f} TB/s" if spec else ""
        lines += [f"Physical floor: {shl.FLOOR_FORMULA}. Here F = {ceilings['tflops']:.0f} TFLOP/s and BW = "
                  f"{ceilings['tbps']:.2f} TB/s ({ceilings['source']}{spec_text}).", ""]  # fmt: skip
    lines += shl.table_lines([r for r in rows if r["provider"] != "*"])
    skipped = [f"{r['case']} C={r['C']:,}" for r in rows if r["provider"] == "*"]
    if skipped:
        lines += ["", f"Not run (the stage's time budget was spent): {', '.join(skipped)}."]
    return lines + [""] + sampling_lines(stage.get("sampling", []), cfg)


def sampling_lines(rows: list[dict], cfg: dict) -> list[str]:
    """The Partial FC rows of the loss stage (bench/partial_fc_sampling.py's table), and those it could not run."""
    from bench import partial_fc_sampling as pfc

    timed, notes = [r for r in rows if "ms" in r], [f"C={r['C']:,}: {r['note']}" for r in rows if "note" in r]
    if not rows:
        return []
    lines = [f"### Partial FC sampling (B={cfg.get('loss_B')}, D={cfg.get('loss_D')}, float32, TH-KD terms)", ""]
    lines += pfc.table_lines(timed) if timed else []
    return lines + ([""] + [f"Not measured: {'; '.join(notes)}."] if notes else []) + [""]


def distill_section(stage: dict | None) -> list[str]:
    from bench import train_step as ts

    stage = stage or {}
    cfg = stage.get("config", {})
    lines = [
        f"### Distillation step ({cfg.get('student')} student, {cfg.get('teacher')} teacher, "
        f"B={cfg.get('batch_size')}, {cfg.get('image_size')}², compiled, {stage.get('autocast', '')})",
        "",
        "The real training loop (`edgekd.train.loop.fit`, data in the main process) on synthetic identities; median",
        "images/s after warm-up (bench/train_step.py). The many-class rows use the teacher cache, so the step is",
        "student + shared-head loss; their ms/step minus that of the identities' row is what the head adds.",
        "",
    ]
    return lines + ts.table_lines(stage.get("rows", [])) + [""]


def latency_section(stage: dict | None) -> list[str]:
    stage = stage or {}
    cfg = stage.get("config", {})
    batches, table = latency_pivot(stage.get("rows", []))
    lines = [
        f"### Latency ({cfg.get('latency_model')}, fp32, median ms per batch)",
        "",
        "edgekd.export.latency: CUDA events around one launch on staged device buffers (GPU rows), host timer for",
        "ONNX Runtime's CPU build (for scale); `+graph`: replayed as a captured CUDA graph. Untrained weights with",
        "BatchNorm statistics re-estimated on synthetic faces (bench/export_latency.py).",
        "",
        "| backend | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|" + "---:|" * len(batches),
    ]
    for name, by_batch in table.items():
        lines.append(f"| {name} | " + " | ".join(latency_cell(by_batch.get(b)) for b in batches) + " |")
    return lines + [""]


def markdown_lines(stages: dict, summary: dict) -> list[str]:
    """The ``## GPU check`` section: machine, stage table, then one subsection per measuring stage."""
    dry = (
        " Dry run: tiny shapes on the CPU, so the numbers prove only that the script works."
        if summary["dry_run"]
        else ""
    )
    lines = [
        SECTION,
        "",
        f"Written by `{summary['command']}` (bench/gpu_check.py) on {summary.get('date', date.today().isoformat())}."
        f"{dry}",
        f"Machine: {machine_line(stages.get('environment'))}. Commit {commit_text(stages.get('environment'))}.",
        "",
        *stage_table(summary),
        "",
    ]
    sections = {"gpu_tests": tests_section, "loss": loss_section, "distill": distill_section,
                "latency": latency_section}  # fmt: skip
    for stage, section in sections.items():
        if stage in summary["stages"]:  # stages left out of this run get no (empty) subsection
            lines += section(stages.get(stage))
    return lines


# ----------------------------------------------------------------------------------------------------- summary


def stage_result(stage: str, data: dict | None) -> str:
    """A few words on what a stage produced."""
    if data is None:
        return "no results file"
    if "error" in data:
        return data["error"][:70]
    rows = data.get("rows", [])
    if stage == "environment":
        return ""
    if stage == "gpu_tests":
        return tests_text(data)
    if stage == "loss":
        return f"{sum(r.get('median') is not None for r in rows)} of {len(rows)} rows timed"
    if stage == "distill":
        return f"{sum('images_per_s' in r for r in rows)} of {len(rows)} settings measured"
    return f"{sum(r['status'] == 'ok' for r in rows)} of {len(rows)} rows measured"


def loss_summary(data: dict | None) -> list[str]:
    providers, configs = loss_pivot((data or {}).get("rows", []))
    if not configs:
        return []
    lines = ["loss fwd+bwd, median ms:".ljust(26) + "".join(f"{p:>10}" for p in providers) + f"{'floor':>10}"]
    for case, C, floor, by_provider in configs:
        cells = "".join(f"{loss_cell(by_provider.get(p)):>10}" for p in providers)
        lines.append(f"  {case} C={C:,}".ljust(26) + cells + f"{_fmt(floor, '.3f', '—'):>10}")
    return lines


def distill_summary(data: dict | None) -> list[str]:
    rows = (data or {}).get("rows", [])
    if not rows:
        return []
    cells = [f"{r['setting'].removeprefix('compiled, ')} {r['images_per_s']:,.0f}" if "images_per_s" in r
             else f"{r['setting'].removeprefix('compiled, ')} failed" for r in rows]  # fmt: skip
    return ["distill images/s: " + " | ".join(cells)]


def latency_summary(data: dict | None) -> list[str]:
    batches, table = latency_pivot((data or {}).get("rows", []))
    if not table:
        return []
    lines = [f"latency ms (batch {'/'.join(map(str, batches))}):"]
    for name, by_batch in table.items():
        lines.append(f"  {name:<22}" + " / ".join(latency_cell(by_batch.get(b)) for b in batches))
    return lines


def install_lines(install: dict | None) -> list[str]:
    """The optional wheels: installed, or why not (a warning; the stages ran without them)."""
    if not install or not install.get("wheels"):
        return []
    failed = [f"{name} NOT installed ({why})" for name, why in install["failed"].items()]
    return [("optional wheels: " + ", ".join([*install["installed"], *failed]))[:300]]


def summary_lines(stages: dict, summary: dict, out: str) -> list[str]:
    """At most about 40 lines: machine, stage table, then the key numbers of each stage."""
    dry = " [dry run]" if summary["dry_run"] else ""
    lines = [
        f"edgekd gpu-check{dry}, out: {out}, total {summary['wall_s']:.0f} s (budget {summary['budget_s']:.0f} s), "
        f"edgekd from {summary.get('edgekd_from')}",
        machine_line(stages.get("environment")),
        f"commit {commit_text(stages.get('environment'))}",
        *install_lines(summary.get("install")),
        "",
        f"{'stage':<13}{'status':<10}{'wall s':>7}{'budget':>8}  result",
    ]
    for stage, s in summary["stages"].items():
        lines.append(f"{stage:<13}{s['status'][:9]:<10}{_fmt(s.get('wall_s'), '.0f'):>7}{s['budget_s']:>8.0f}  "
                     f"{stage_result(stage, stages.get(stage))}")  # fmt: skip
    lines.append("")
    for failure in failed_tests(stages.get("gpu_tests"))[:5]:
        lines.append(f"FAILED {failure[:150]}")
    lines += [f"atomics spread {spread_text(e)}" for e in spreads(stages.get("gpu_tests"))]
    lines += loss_summary(stages.get("loss"))
    lines += distill_summary(stages.get("distill"))
    lines += latency_summary(stages.get("latency"))
    lines += ["", f"merge into BENCHMARKS.md: python -m bench.gpu_check --merge {out}"]
    return lines
