"""GPU check: one command that records a GPU machine's environment, runs the GPU tests, and measures the shared-head
loss, the distillation step and mbf latency, in under 8 minutes; ``--dry-run`` runs the same stages on a CPU at
tiny sizes in well under a minute, so CI proves the script works before a GPU session spends device time on it.

Stages, each in its own process with its own time budget (a stage that fails or runs out of time is recorded and
the next one starts; each writes its JSON after every result, so even a killed stage leaves what it measured):

a. ``environment`` (15 s): GPU, driver (nvidia-smi), CUDA, package versions, TF32 settings, commit.
b. ``gpu_tests`` (110 s): ``pytest -m gpu tests/losses tests/kernels tests/distributed``: every loss backend
   (reference, chunked, triton) on CUDA against float64 on odd shapes in fp32, fp16 and bf16; ArcFace fallback rows
   (θ + m > π); a ``torch.compile(fullgraph=True)`` training step on CUDA; the triton backend's atomics run 20 times
   on the same inputs, the spread of the results recorded; the class-sharded loss under NCCL with the chunked and
   Triton sweeps (2 ranks on 2 GPUs, a world of one on one GPU). Without CUDA they skip. With pytest-xdist (the GPU
   image has it) 8 processes share the work, most of which is compiling Triton kernel variants.
c. ``loss`` (135 s): bench/shared_head_loss.py's method at B = 512, D = 512, C ∈ {100k, 1M, 2M}, bf16: reference,
   torch.compile(reference), chunked, triton and Liger-Kernel's fused linear cross entropy (plain CE; recorded as
   'not installed' without it), plain CE and the full ArcFace TH-KD loss; time, peak memory and the physical floor
   (FLOPs of the logit matmuls at the measured bf16 matmul rate, bytes of the class matrices at the measured
   bandwidth; the formula is in the output).
d. ``distill`` (130 s): bench/train_step.py, compiled: mbf student, r50 teacher, B = 256, 112×112, bf16 autocast:
   images/s with a live teacher, with the teacher cache, student alone, and with 100k and 1M classes.
e. ``latency`` (90 s): mbf at batch 1, 8 and 64 through edgekd.export.latency: torch eager, torch.compile, each also
   as a CUDA graph, and ONNX Runtime's CPU build for scale.

Outputs in ``--out`` (8 files): ``environment.json``, ``gpu_tests.json``, ``loss.json``, ``distill.json``,
``latency.json``, ``summary.json`` (status, wall time and budget per stage), ``gpu_check.md`` (a ``## GPU check``
section; ``python bench/gpu_check.py --merge DIR`` puts it into BENCHMARKS.md) and ``log.txt`` (every stage's
output). The last thing printed is a one-screen summary. The exit status is 0 only when every stage is ``ok``.

    make gpu-check OUT=dir             # on a GPU machine (python3 there when .venv is missing; PYTHON= overrides)
    make gpu-check DRY=1               # the dry run, here
    python bench/gpu_check.py --out dir [--dry-run] [--stages loss distill] [--budget loss=200]

edgekd needs no install: where the importable edgekd is not this tree (the GPU image has none), the stages import
it from the tree through a folder of symbolic links on PYTHONPATH (``tree_overlay``). The stages run in the order
above, most important first; to repeat one that ran out of time, pass ``--stages NAME --budget NAME=SECONDS``.

On the device machine (the ``run`` tool; its image has no venv and no network), pass this command with timeout_s
600, and carry [".whl"] when the Liger-Kernel wheel was first downloaded into .whl (git ignores it; pure Python:
``python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform
manylinux2014_x86_64 -d .whl liger-kernel==0.8.5``):

    export PYTHONUNBUFFERED=1; if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1; fi; python3 bench/gpu_check.py --out $OUT
"""  # noqa: E501

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import gpu_check_stages as stages_module
from gpu_check_stages import STAGES, write_json

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = {"environment": 15, "gpu_tests": 110, "loss": 135, "distill": 130, "latency": 90}
TOTAL_BUDGET_S = 480  # the 8 minutes; a stage gets the smaller of its own budget and what is left
STAGE_FILES = {stage: f"{stage}.json" for stage in STAGES}
SUMMARY, MARKDOWN, LOG = "summary.json", "gpu_check.md", "log.txt"
OUTPUTS = (*STAGE_FILES.values(), SUMMARY, MARKDOWN, LOG)
KILL_MARGIN_S = 5  # the child is told its budget minus this, so it can record before the parent kills it


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="results folder (at most 8 files are written there)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (Triton's interpreter)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="a subset, in order")
    parser.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS", help="override a budget")
    parser.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all stages")
    parser.add_argument("--from-tree", action="store_true", help="import edgekd from the tree even if installed")
    parser.add_argument("--merge", type=Path, metavar="DIR", help="merge DIR/gpu_check.md into BENCHMARKS.md")
    parser.add_argument("--benchmarks", type=Path, default=ROOT / "BENCHMARKS.md", help="the file --merge edits")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage here
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--budget-s", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.merge or args.out):
        parser.error("--out is required (or --merge DIR)")
    return args


def budgets(overrides: list[str]) -> dict[str, float]:
    """Per-stage budgets in seconds, with ``STAGE=SECONDS`` overrides."""
    result = dict(BUDGET_S)
    for item in overrides:
        stage, _, seconds = item.partition("=")
        if stage not in result or not seconds:
            raise SystemExit(f"--budget takes STAGE=SECONDS with STAGE one of {', '.join(STAGES)}; got {item!r}")
        result[stage] = float(seconds)
    return result


def child_env(dry_run: bool, work: Path, extra: dict) -> dict:
    """The stages' environment: unbuffered output, a private edgekd cache, ``extra`` (``import_setup``); the dry run
    hides any GPU and runs Triton kernels in its interpreter (chosen before the kernels are defined, hence here)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", EDGEKD_CACHE_DIR=str(work / "edgekd-cache"), **extra)
    if dry_run:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    return env


def tree_overlay(work: Path) -> Path:
    """A folder that makes the tree importable without installing it: its ``edgekd/`` holds links to the tree's
    edgekd/ entries plus one link per side folder (kernels/, export/, calib/), the package-dir mapping of
    pyproject.toml rebuilt with symbolic links."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    overlay = work / "tree"
    package = overlay / "edgekd"
    package.mkdir(parents=True, exist_ok=True)
    for entry in (ROOT / mapping["edgekd"]).iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if name.startswith("edgekd."):
            (package / name.removeprefix("edgekd.")).symlink_to(ROOT / folder)
    return overlay


def imports_this_tree(env: dict) -> bool:
    """Whether a child process imports edgekd (with its side folders) from this tree, e.g. an editable install."""
    code = "import edgekd.kernels, edgekd.export, edgekd.calib; print(edgekd.kernels.__file__)"
    out = subprocess.run([sys.executable, "-P", "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    return out.returncode == 0 and Path(out.stdout.strip()).resolve().parent == ROOT / "kernels"


def import_setup(work: Path, from_tree: bool) -> tuple[dict, str]:
    """Environment additions that let the stages import edgekd, and how: the installed package when it is this
    tree, else (or with ``--from-tree``) ``tree_overlay`` on PYTHONPATH; the GPU image needs no install that way."""
    if not from_tree and imports_this_tree(dict(os.environ)):
        return {}, "installed (this tree)"
    path = os.pathsep.join(p for p in (str(tree_overlay(work)), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}, "the tree, through a folder of links on PYTHONPATH (no install)"


def kill_group(pgid: int) -> None:
    """Kill what is left of a stage's process group (compile workers, pytest); all of it was started here."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_stage_process(stage: str, args, budget: float, work: Path, env: dict, log) -> dict:
    """Run one stage in a child process (its own session) for at most ``budget`` seconds; its outcome."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--out", str(args.out),
           "--work", str(work / stage), "--budget-s", str(max(1.0, budget - KILL_MARGIN_S))]  # fmt: skip
    if args.dry_run:
        cmd.append("--dry-run")
    log.write(f"\n===== {stage} (budget {budget:.0f} s) =====\n")
    log.flush()
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        rc = None
    kill_group(proc.pid)
    proc.wait()
    wall = round(time.monotonic() - started, 1)
    path = args.out / STAGE_FILES[stage]
    data = read_json(path)
    if rc is None:
        status = "timeout"
    elif rc != 0:
        status = "failed"
    else:
        status = (data or {}).get("status", "failed: no results file")
    if data is not None and data.get("status") == "running":  # killed mid-way: its file must not say it still runs
        write_json(path, dict(data, status=status))
    return {"status": status, "exit": rc, "wall_s": wall, "budget_s": budget}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def clear_outputs(out: Path) -> None:
    """Remove this script's outputs from an earlier run, so no stale file passes for a new result."""
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)


def run_all(args) -> dict:
    """Every selected stage in order, each within its budget and the total; returns the summary."""
    per_stage = budgets(args.budget)
    command = "python bench/gpu_check.py " + " ".join(sys.argv[1:])
    summary = {"command": command, "dry_run": args.dry_run, "budget_s": 0.0, "stages": {}}
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="edgekd-gpu-check-"))
    try:
        extra, summary["edgekd_from"] = import_setup(work, args.from_tree)
        env = child_env(args.dry_run, work, extra)
        with open(args.out / LOG, "a") as log:
            for stage in args.stages:
                budget = min(per_stage[stage], args.total_budget - (time.monotonic() - started))
                if budget < 5:
                    summary["stages"][stage] = {"status": "not run: total budget spent", "budget_s": 0.0}
                    continue
                summary["budget_s"] += budget
                summary["stages"][stage] = run_stage_process(stage, args, budget, work, env, log)
                s = summary["stages"][stage]
                print(f"[gpu-check] {stage}: {s['status']} ({s['wall_s']:.0f} s of {budget:.0f})", flush=True)
                summary["wall_s"] = round(time.monotonic() - started, 1)
                write_json(args.out / SUMMARY, summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    write_json(args.out / SUMMARY, summary)
    return summary


def render(args, summary: dict) -> list[str]:
    """Write the markdown section and return the summary lines; a rendering bug costs the report, not the results."""
    import gpu_check_report as report

    stages = {stage: read_json(args.out / STAGE_FILES[stage]) for stage in STAGES}
    try:
        (args.out / MARKDOWN).write_text("\n".join(report.markdown_lines(stages, summary)).rstrip("\n") + "\n")
        return report.summary_lines(stages, summary, str(args.out))
    except Exception as exc:  # the JSON files hold every number; say what broke and keep going
        message = f"report rendering failed: {type(exc).__name__}: {exc}"
        (args.out / MARKDOWN).write_text(f"{report.SECTION}\n\n{message}\n")
        return [message, json.dumps(summary["stages"], indent=1)]


def merge(args) -> None:
    from gpu_check_report import SECTION
    from markdown_section import merge_section

    lines = (args.merge / MARKDOWN).read_text().splitlines()
    merge_section(args.benchmarks, SECTION, lines)
    print(f"merged {args.merge / MARKDOWN} into {args.benchmarks}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        merge(args)
        return 0
    if args.stage:
        stages_module.run_stage(args.stage, args.out, args.work, args.dry_run, args.budget_s, STAGE_FILES[args.stage])
        return 0
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    clear_outputs(args.out)
    summary = run_all(args)
    print("\n".join(render(args, summary)), flush=True)
    return 0 if all(s["status"] == "ok" for s in summary["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
