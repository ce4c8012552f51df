"""GPU check: one command that records a GPU machine's environment, runs the GPU tests, and measures the shared-head
loss, the distillation step and mbf latency, in at most 520 s (the device tool's call is 600 s); ``--dry-run`` runs
the same stages on a CPU at tiny sizes in about a minute, so CI proves the script works before a GPU session spends
device time on it. Nothing here assumes a second GPU.

Steps, each stage in its own process (a stage that fails or runs out of time is recorded and the next one starts;
each writes its JSON after every result, so even a killed stage leaves what it measured). A step's seconds are its
own budget plus whatever the steps before it left unspent; none runs past the total, 520 s from the start:

0. ``install`` (30 s): the optional wheels in ``.whl/`` (Liger-Kernel), each pip-installed into a scratch folder on
   the stages' PYTHONPATH; one that does not install is a warning, and the stages run without it.
a. ``environment`` (25 s): commit (git, else ``bench/.gpu-check-commit``), package versions, GPU, CUDA, TF32
   settings, then nvidia-smi (started first, waited for last, within the stage's seconds: on a cold machine it can
   take 30 s); each field recorded as soon as it is known.
b. ``gpu_tests`` (160 s): ``pytest -v`` over the ``gpu``-marked tests of tests/losses, tests/kernels,
   tests/distributed and tests/train/test_gpu_first_contact.py, through bench/gpu_check_pytest.py: each test's
   result written as it finishes (a killed stage still says what passed, and which tests were running), 120 s at
   most per test. Every loss backend (reference, chunked, triton) on CUDA against float64 on odd shapes in fp32,
   fp16 and bf16; ArcFace fallback rows (θ + m > π); a ``torch.compile(fullgraph=True)`` training step; the triton
   backend's atomics run 20 times on the same inputs, the spread recorded; the class-sharded loss under NCCL (2
   ranks on 2 GPUs, a world of one on one GPU); what a GPU breaks first in training: the class-sharded step under
   NCCL with a DCP save and resume, ``fit`` under bf16 autocast with the chunked and the Triton loss, the compiled
   step with Triton. Without CUDA they skip; the dry run runs the quick CPU variants of the last group instead. With
   pytest-xdist (the GPU image has it) 8 processes share the work, most of which is compiling kernels.
c. ``loss`` (125 s): bench/shared_head_loss.py's method at B = 512, D = 512, C ∈ {100k, 1M, 2M}, bf16: reference,
   torch.compile(reference), chunked, triton and Liger-Kernel's fused linear cross entropy (plain CE; recorded as
   'not installed' without it), plain CE and the full ArcFace TH-KD loss; time, peak memory and the physical floor
   (FLOPs of the logit matmuls at the measured bf16 matmul rate, bytes of the class matrices at the measured
   bandwidth; the formula is in the output).
d. ``distill`` (110 s): bench/train_step.py, compiled: mbf student, r50 teacher, B = 256, 112×112, bf16 autocast:
   images/s with a live teacher, with the teacher cache, student alone, and with 100k and 1M classes.
e. ``latency`` (70 s): mbf at batch 1, 8 and 64 through edgekd.export.latency: torch eager, torch.compile, each also
   as a CUDA graph, and ONNX Runtime's CPU build for scale.

Outputs in ``--out`` (7 files, so that a stray temporary still fits the device tool's 8): ``environment.json``,
``gpu_tests.json``, ``loss.json``, ``distill.json``, ``latency.json``, ``summary.json`` (date, install, status, wall
time and budget per stage) and ``log.txt`` (pip's and every stage's output). The last thing printed is a one-screen
summary; ``python -m bench.gpu_check --merge DIR`` renders DIR's results as the ``## GPU check`` section of
BENCHMARKS.md. The exit status is 0 only when every stage is ``ok``.

    make gpu-check OUT=dir             # on a GPU machine (python3 there when .venv is missing; PYTHON= overrides)
    make gpu-check DRY=1               # the dry run, here (it also writes bench/.gpu-check-commit)
    make gpu-stamp                     # only that: the commit, for a device machine without .git
    python -m bench.gpu_check --out dir [--dry-run] [--stages loss distill] [--budget loss=200]

Run it from the repository root (bench is a package). edgekd needs no install: where the importable edgekd is not
this tree (the GPU image has none), the stages import it from the tree through a folder of symbolic links on
PYTHONPATH (``tree_overlay``). The stages run in the order above, most important first; to repeat one that ran out
of time, pass ``--stages NAME --budget NAME=SECONDS``.

On the device machine (the ``run`` tool; its image has no venv, no network and no .git), first run ``make
gpu-stamp`` here (``git rev-parse HEAD`` and a dirty flag into bench/.gpu-check-commit, which git neither tracks
nor ignores, so it travels), then pass this command with timeout_s 600, and carry [".whl"] when the Liger-Kernel
wheel was first downloaded into .whl (git ignores it; pure Python: ``python3 -m pip download --no-deps
--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl
liger-kernel==0.8.5``):

    export PYTHONUNBUFFERED=1; python3 -m bench.gpu_check --out $OUT
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
from datetime import UTC, date, datetime
from pathlib import Path

from bench import gpu_check_stages as stages_module
from bench.gpu_check_stages import STAGES, STAMP, write_json

START = time.monotonic()  # this process's start: the total budget counts from here
ROOT = Path(__file__).resolve().parents[1]
INSTALL_S = 30  # the optional wheels' install (pip, a few seconds a wheel)
BUDGET_S = {"environment": 25, "gpu_tests": 160, "loss": 125, "distill": 110, "latency": 70}
# The install and the stages, from START. With Python's start and the summary the command ends by 525 s or so, a
# minute and more inside the device tool's 600 s call.
TOTAL_BUDGET_S = 520
STAGE_FILES = {stage: f"{stage}.json" for stage in STAGES}
SUMMARY, LOG = "summary.json", "log.txt"
OUTPUTS = (*STAGE_FILES.values(), SUMMARY, LOG)
KILL_MARGIN_S = 5  # the child is told its budget minus this, so it can record before the parent kills it


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help=f"results folder (at most {len(OUTPUTS)} files are written there)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (Triton's interpreter)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="a subset, in order")
    parser.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS", help="override a budget")
    parser.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S, help="seconds for everything")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="optional wheels to install (*.whl)")
    parser.add_argument("--from-tree", action="store_true", help="import edgekd from the tree even if installed")
    parser.add_argument("--merge", type=Path, metavar="DIR", help="render DIR's results into BENCHMARKS.md")
    parser.add_argument("--benchmarks", type=Path, default=ROOT / "BENCHMARKS.md", help="the file --merge edits")
    parser.add_argument("--stamp", action="store_true", help=f"write this checkout's commit to {STAMP.name}")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage here
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--budget-s", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.merge or args.out or args.stamp):
        parser.error("--out is required (or --merge DIR, or --stamp)")
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


def write_stamp(path: Path = STAMP) -> str:
    """Write this checkout's commit (``source_commit``: ``+dirty`` when tracked files differ) to ``path`` for the
    environment stage of a device run, whose copy of the tree has no .git; returns the commit."""
    # A child imports edgekd from the tree (the current folder comes first on its sys.path): this process does not
    # import edgekd, which need not be importable here.
    code = f"from edgekd.utils.env import source_commit; print(source_commit({str(ROOT)!r}) or '')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    commit = out.stdout.strip()
    if out.returncode != 0 or not commit:
        raise SystemExit(f"gpu-check --stamp: no git commit for {ROOT} (not a checkout, or no git); nothing written")
    stamped = datetime.now(UTC).isoformat(timespec="seconds")
    write_json(path, {"git_commit": commit, "stamped_at": stamped})
    return commit


def install_wheels(folder: Path, site: Path, seconds: float, log) -> dict:
    """pip-install each optional wheel in ``folder`` (Liger-Kernel, a provider of the loss stage) into ``site``
    within ``seconds`` in all; one that does not install is a printed warning, and the stages run without it."""
    result: dict = {"wheels": [w.name for w in sorted(folder.glob("*.whl"))], "installed": [], "failed": {}}
    deadline = time.monotonic() + seconds
    for name in result["wheels"]:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), str(folder / name)]  # fmt: skip
        log.write(f"\n===== install {name} =====\n")
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()))
            log.write(out.stdout + out.stderr)
            lines = (out.stderr or out.stdout).strip().splitlines()
            error = None if out.returncode == 0 else f"pip exit {out.returncode}: {lines[-1] if lines else ''}"[:300]
        except subprocess.TimeoutExpired:
            error = f"pip ran past the install's {seconds:.0f} s"
        log.flush()
        if error:
            result["failed"][name] = error
            print(f"[gpu-check] warning: optional wheel {name} did not install, going on without it ({error})",
                  flush=True)  # fmt: skip
        else:
            result["installed"].append(name)
    return result


def child_env(dry_run: bool, work: Path, extra: dict) -> dict:
    """The stages' environment: unbuffered output, a private edgekd cache, ``extra`` (``import_setup``), and the
    import path of ``python -m bench.NAME``; the dry run hides any GPU and runs Triton kernels in its interpreter
    (chosen before the kernels are defined, hence here).

    The stages, and every process they start (a loss worker, pytest), import bench from the repository root at the
    end of PYTHONPATH (``with_root``), with PYTHONSAFEPATH set: ``python -m`` would put the current folder (the
    root, whose edgekd/ lacks the side folders) first on sys.path, ahead of ``tree_overlay``'s edgekd."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", EDGEKD_CACHE_DIR=str(work / "edgekd-cache"), **extra)
    env.update(PYTHONPATH=stages_module.with_root(env.get("PYTHONPATH")), PYTHONSAFEPATH="1")
    if dry_run:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    return env


def tree_overlay(work: Path) -> Path:
    """A folder that makes the tree importable without installing it: its ``edgekd/`` holds links to the tree's
    edgekd/ entries plus one link per side folder (kernels/, export/, calib/), the package-dir mapping of
    pyproject.toml rebuilt with symbolic links. It holds edgekd only: bench comes from the root (``child_env``)."""
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
    """Run one stage in a child process (``python -m bench.gpu_check --stage NAME`` from the root, in its own
    session) for at most ``budget`` seconds; its outcome."""
    cmd = [sys.executable, "-m", "bench.gpu_check", "--stage", stage, "--out", str(args.out),
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


def with_site(extra: dict, site: Path) -> dict:
    """``extra`` (``import_setup``'s) with ``site``, where the optional wheels went, first on PYTHONPATH."""
    rest = extra.get("PYTHONPATH", os.environ.get("PYTHONPATH"))
    return dict(extra, PYTHONPATH=os.pathsep.join(filter(None, (str(site), rest))))


def run_all(args) -> dict:
    """The install, then every selected stage in order, each within its budget plus what the steps before it left
    unspent, and all within the total; returns the summary."""
    per_stage = budgets(args.budget)
    command = "python -m bench.gpu_check " + " ".join(sys.argv[1:])
    summary = {"command": command, "date": date.today().isoformat(), "dry_run": args.dry_run,
               "budget_s": args.total_budget, "stages": {}}  # fmt: skip
    deadline = START + args.total_budget
    work = Path(tempfile.mkdtemp(prefix="edgekd-gpu-check-"))
    try:
        with open(args.out / LOG, "a") as log:
            site = work / "site"
            summary["install"] = install_wheels(args.wheels, site, min(INSTALL_S, deadline - time.monotonic()), log)
            extra, summary["edgekd_from"] = import_setup(work, args.from_tree)
            env = child_env(args.dry_run, work, with_site(extra, site) if summary["install"]["installed"] else extra)
            planned = START + INSTALL_S  # where the plan ends each step: the sum of the budgets so far
            for stage in args.stages:
                planned += per_stage[stage]
                budget = min(planned, deadline) - time.monotonic()  # its own seconds and those left unspent
                if budget < 5:
                    summary["stages"][stage] = {"status": "not run: total budget spent", "budget_s": 0.0}
                    continue
                summary["stages"][stage] = run_stage_process(stage, args, budget, work, env, log)
                summary["stages"][stage]["own_budget_s"] = per_stage[stage]
                s = summary["stages"][stage]
                print(f"[gpu-check] {stage}: {s['status']} ({s['wall_s']:.0f} s of {budget:.0f})", flush=True)
                summary["wall_s"] = round(time.monotonic() - START, 1)
                write_json(args.out / SUMMARY, summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary["wall_s"] = round(time.monotonic() - START, 1)
    write_json(args.out / SUMMARY, summary)
    return summary


def load_results(folder: Path) -> tuple[dict, dict]:
    """The stages' JSON files (None for a missing one) and the summary of a results folder."""
    summary = read_json(folder / SUMMARY)
    if summary is None:
        raise SystemExit(f"{folder / SUMMARY}: missing or not JSON; is {folder} a gpu-check results folder?")
    return {stage: read_json(folder / STAGE_FILES[stage]) for stage in STAGES}, summary


def screen(args) -> list[str]:
    """The one-screen summary; a rendering bug costs the summary, not the results (the JSON files hold them)."""
    from bench import gpu_check_report as report

    stages, summary = load_results(args.out)
    try:
        return report.summary_lines(stages, summary, str(args.out))
    except Exception as exc:
        return [f"summary rendering failed: {type(exc).__name__}: {exc}", json.dumps(summary["stages"], indent=1)]


def merge(args) -> None:
    """Render a results folder as the ``## GPU check`` section of BENCHMARKS.md (the report needs torch)."""
    from bench.gpu_check_report import SECTION, markdown_lines
    from bench.markdown_section import merge_section

    stages, summary = load_results(args.merge)
    merge_section(args.benchmarks, SECTION, markdown_lines(stages, summary))
    print(f"merged {args.merge} into {args.benchmarks}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stamp:
        print(f"{STAMP.relative_to(ROOT)}: {write_stamp()}")
        return 0
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
    print("\n".join(screen(args)), flush=True)
    return 0 if all(s["status"] == "ok" for s in summary["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
