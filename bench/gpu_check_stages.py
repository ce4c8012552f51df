"""The stages of bench/gpu_check.py. Each runs in its own process (``python -m bench.gpu_check --stage NAME``) and
rewrites its JSON file after every result, so a stage that fails or runs out of time still leaves what it measured.

A stage's JSON: ``stage``, ``status`` (``running`` until it ends; then ``ok``, ``partial`` when some rows or tests
failed, or ``skipped``), ``dry_run``, ``config`` (the sizes), ``rows`` and stage-specific keys.

The stages import torch and edgekd inside their functions: bench/gpu_check.py imports this module too, and it
imports neither (edgekd may not even be importable there; the stages get it through ``tree_overlay``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("environment", "gpu_tests", "loss", "distill", "latency")
# What a GPU breaks first in training; the dry run runs its CPU variants too (gpu_check_pytest's --gpu-check-also).
FIRST_CONTACT = "tests/train/test_gpu_first_contact.py"
GPU_TEST_PATHS = ("tests/losses", "tests/kernels", "tests/distributed", FIRST_CONTACT)
# The commit of the tree the device machine got, where .git does not travel: untracked and not ignored, so it does.
STAMP = ROOT / "bench" / ".gpu-check-commit"
# Notes of loss rows that say a provider does not apply here; any other note is a failure.
NOT_APPLICABLE = ("not installed", "plain CE only", "GPU only", "skipped: does not fit")


@dataclass(frozen=True)
class Profile:
    """The sizes of one mode: the GPU run, or the dry run that proves the script on a CPU in seconds."""

    device: str
    loss_B: int
    loss_D: int
    loss_C: tuple[int, ...]
    loss_cases: tuple[str, ...]
    loss_rounds: int
    loss_runs: int
    loss_warmup: int
    loss_seconds: float  # about this much timing per provider and size at most (fewer steps per round)
    compile_backend: str  # of the compile row; the dry run's also replaces Inductor everywhere (use_light_compiler)
    student: str
    teacher: str
    batch_size: int
    image_size: int
    identities: int
    steps: int
    step_warmup: int
    classes: tuple[int, ...]
    latency_model: str
    batches: tuple[int, ...]
    latency_iters: int
    latency_seconds: float
    test_timeout: float  # seconds per test of the gpu_tests stage (gpu_check_pytest)


GPU = Profile(
    device="cuda", loss_B=512, loss_D=512, loss_C=(100_000, 1_000_000, 2_000_000), loss_cases=("plain_ce", "full"),
    loss_rounds=5, loss_runs=4, loss_warmup=2, loss_seconds=2.0, compile_backend="inductor",
    student="mbf", teacher="r50", batch_size=256, image_size=112, identities=16, steps=12, step_warmup=4,
    classes=(100_000, 1_000_000), latency_model="mbf", batches=(1, 8, 64), latency_iters=50, latency_seconds=0.5,
    test_timeout=120.0,
)  # fmt: skip
DRY = Profile(
    device="cpu", loss_B=8, loss_D=16, loss_C=(64,), loss_cases=("full",),
    loss_rounds=2, loss_runs=1, loss_warmup=1, loss_seconds=10.0, compile_backend="aot_eager",
    student="cnn_tiny", teacher="r_tiny", batch_size=8, image_size=32, identities=4, steps=3, step_warmup=1,
    classes=(1000,), latency_model="cnn_tiny", batches=(1, 2), latency_iters=3, latency_seconds=0.0,
    test_timeout=60.0,
)  # fmt: skip


def with_root(pythonpath: str | None) -> str:
    """``pythonpath`` with the repository root appended where it is missing: ``bench`` imports from the root in a
    child process, behind whatever comes first (``tree_overlay``'s edgekd; the root's own edgekd/ lacks the side
    folders)."""
    paths = [p for p in (pythonpath or "").split(os.pathsep) if p]
    return os.pathsep.join(paths if str(ROOT) in paths else [*paths, str(ROOT)])


def write_json(path: Path, data) -> None:
    """Replace ``path`` atomically (written beside it, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


class StageRecord:
    """One stage's JSON file, rewritten whole after every change."""

    def __init__(self, path: Path, stage: str, dry_run: bool, config: dict) -> None:
        self.path, self.started = path, time.perf_counter()
        self.data = {"stage": stage, "status": "running", "dry_run": dry_run, "config": config, "rows": []}
        self.save()

    def set(self, **values) -> None:
        self.data.update(values)
        self.save()

    def add_row(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.save()

    def finish(self, status: str) -> None:
        self.set(status=status, wall_s=round(time.perf_counter() - self.started, 1))

    def save(self) -> None:
        write_json(self.path, self.data)


@dataclass
class Context:
    """What a stage needs: its record, the mode's sizes, a scratch folder and the time it must end by."""

    record: StageRecord
    profile: Profile
    dry_run: bool
    work: Path
    deadline: float  # time.monotonic() value

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


def use_light_compiler() -> None:
    """Dry run only: make ``torch.compile`` use ``aot_eager`` (Dynamo and AOTAutograd, no code generation).

    Inductor's C++ compile of even a tiny network takes minutes on a 2-core CI machine; the dry run proves the
    stages' code paths (tracing, graph breaks, custom ops under compile), not Inductor. The GPU run uses Inductor.
    """
    import torch

    compile_with_inductor = torch.compile

    def compile_light(*args, **kwargs):
        kwargs.pop("mode", None)  # a mode is an Inductor setting
        kwargs["backend"] = "aot_eager"
        return compile_with_inductor(*args, **kwargs)

    torch.compile = compile_light


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------ environment


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


NVIDIA_SMI_FIELDS = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "power.limit", "pstate")


def start_nvidia_smi() -> subprocess.Popen | None:
    """``nvidia-smi`` started now, so that it runs while torch imports (None where it is missing): on a cold machine
    it can take half a minute."""
    cmd = ["nvidia-smi", f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader"]
    try:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except OSError:
        return None


def nvidia_smi_result(proc: subprocess.Popen | None, timeout: float) -> dict | None:
    """Name, driver, memory and clocks from ``start_nvidia_smi``'s process, waiting at most ``timeout`` seconds
    (None where it is missing or fails; an ``error`` where it did not answer in time)."""
    if proc is None:
        return None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"no answer in {timeout:.0f} s"}
    if proc.returncode != 0 or not out.strip():
        return None
    values = [v.strip() for v in out.strip().splitlines()[0].split(",")]
    return dict(zip(NVIDIA_SMI_FIELDS, values, strict=False))


def recorded_commit(root: Path, stamp: Path) -> tuple[str | None, str]:
    """The commit of the tree at ``root`` and where it was read: git, else ``stamp`` (``make gpu-stamp`` writes it
    before a device run, whose copy of the tree has no .git)."""
    from edgekd.utils.env import source_commit

    commit = source_commit(root)
    if commit:
        return commit, "git"
    try:
        data = json.loads(stamp.read_text())
        return data["git_commit"], f"{stamp.name}, stamped {data['stamped_at']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"unknown: no git and no readable {stamp.name} (make gpu-stamp before the device run)"


def stage_environment(ctx: Context) -> str:
    """Each field recorded as soon as it is known, slow ones last: a stage cut short keeps the ones before."""
    smi = start_nvidia_smi()
    env: dict = {}

    def add(**fields) -> None:
        env.update(fields)
        ctx.record.set(environment=env)

    commit, source = recorded_commit(ROOT, STAMP)
    add(git_commit=commit, git_commit_source=source)
    add(python_executable=sys.executable, machine=platform.machine())
    add(triton_interpret=os.environ.get("TRITON_INTERPRET"))
    from edgekd.utils.env import cpu_name, gpu_info, package_versions, thread_info  # inside: see the module doc

    add(versions=package_versions())
    add(liger_kernel=package_version("liger-kernel") or "not installed")
    add(platform=platform.platform())
    add(cpu=cpu_name())
    import torch

    import edgekd.kernels

    add(edgekd_kernels=edgekd.kernels.__file__)  # which edgekd the stages import (installed, or the tree's links)
    add(threads=thread_info())
    add(cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, float32_matmul_precision=torch.get_float32_matmul_precision())
    gpu = gpu_info()  # initializes CUDA
    if gpu is not None:
        gpu["multiprocessors"] = torch.cuda.get_device_properties(0).multi_processor_count
    add(gpu=gpu)
    add(nvidia_smi=nvidia_smi_result(smi, timeout=max(1.0, ctx.seconds_left() - 2)))
    return "ok"


# -------------------------------------------------------------------------------------------------- gpu tests


COUNTED = ("passed", "failed", "error", "skipped")
POLL_S = 0.5  # how often the stage folds new test results into its JSON while pytest runs


def read_results(path: Path) -> dict:
    """gpu_check_pytest's results file folded: counts, the finished tests in the order they started, and the tests
    started but not finished (running, or killed while running). A line cut short by a kill is skipped."""
    latest: dict[str, dict] = {}
    text = path.read_text() if path.is_file() else ""
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        latest[entry["test"]] = entry
    tests = [e for e in latest.values() if e["outcome"] != "running"]
    counts = {k: sum(e["outcome"] == k for e in tests) for k in COUNTED}
    return {"counts": counts, "tests": tests, "running": [t for t, e in latest.items() if e["outcome"] == "running"]}


WORKERS = 8  # pytest-xdist processes of the GPU run


def pytest_workers(dry_run: bool) -> list[str]:
    """``-n 8`` where pytest-xdist is installed (the GPU image has it): most of this stage is compiling Triton kernel
    variants, which parallel processes do side by side; nothing in the dry run (a few quick CPU tests)."""
    return ["-n", str(WORKERS)] if not dry_run and importlib.util.find_spec("xdist") is not None else []


def pytest_options(dry_run: bool, timeout: float) -> list[str]:
    """gpu-check's own options: the time limit per test, the dry run's CPU variants, the workers."""
    also = [f"--gpu-check-also={FIRST_CONTACT}"] if dry_run else []
    return [f"--gpu-check-timeout={timeout:g}", *also, *pytest_workers(dry_run)]


def pytest_command(options: list[str], results: Path) -> list[str]:
    """Verbose pytest over GPU_TEST_PATHS with gpu-check's plugin (selection, time limit per test, results as they
    come) and ``options``.

    ``--capture=sys`` leaves file descriptors 1 and 2 alone: what CUDA, NCCL or faulthandler print goes to the log.
    The absolute paths, the scratch folder as the current one and ``-o pythonpath=`` (pyproject's puts the root
    first) keep the repository root off the front of sys.path (python -m puts the current folder there), where its
    edgekd/, which lacks the side folders, would shadow the importable one; the plugin's bench comes from the root
    at the end of PYTHONPATH (``run_pytest``).
    """
    return [sys.executable, "-m", "pytest", "-p", "bench.gpu_check_pytest", "-o", "pythonpath=", "-v", "-rfE",
            "--capture=sys", "--durations=10", "-p", "no:cacheprovider", f"--rootdir={ROOT}",
            f"--gpu-check-results={results}", *options, *(str(ROOT / p) for p in GPU_TEST_PATHS)]  # fmt: skip


def run_pytest(ctx: Context, cmd: list[str], results: Path) -> int | None:
    """Run ``cmd`` until it ends or the stage's time is nearly spent, folding ``results`` into the stage's JSON as
    tests finish; pytest's exit status, or None when it was stopped."""
    path = with_root(os.environ.get("PYTHONPATH"))  # the plugin, bench.gpu_check_pytest
    # Each process's Inductor would start a pool of compile workers as wide as the machine: share the CPUs instead.
    threads = str(max(1, (os.cpu_count() or WORKERS) // WORKERS))
    proc = subprocess.Popen(
        cmd, cwd=ctx.work, env=dict(os.environ, PYTHONPATH=path, TORCHINDUCTOR_COMPILE_THREADS=threads)
    )
    deadline, seen = time.monotonic() + max(10.0, ctx.seconds_left() - 5), -1
    rc = None
    while rc is None and time.monotonic() < deadline:
        try:
            rc = proc.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            pass
        size = results.stat().st_size if results.is_file() else 0
        if size != seen:
            seen = size
            ctx.record.set(**read_results(results))
    if rc is None:
        proc.kill()  # its xdist workers are in the stage's process group, which gpu_check.py kills when it ends
        proc.wait()
    ctx.record.set(**read_results(results))
    return rc


def stage_gpu_tests(ctx: Context) -> str:
    """The ``gpu``-marked tests (``gpu_check_pytest``); they skip without CUDA, and the dry run adds the CPU variants
    of the first-contact tests."""
    results = ctx.work / "results.jsonl"
    options = pytest_options(ctx.dry_run, ctx.profile.test_timeout)
    ctx.record.set(command=" ".join(["pytest -p bench.gpu_check_pytest -v", *options, *GPU_TEST_PATHS]))
    rc = run_pytest(ctx, pytest_command(options, results), results)
    ctx.record.set(pytest_exit=rc)
    if rc is None:
        return "timeout"
    counts, running = ctx.record.data["counts"], ctx.record.data["running"]
    if rc != 0 or counts["failed"] or counts["error"] or running:
        return "partial"
    return "ok" if ctx.dry_run or counts["passed"] else "partial"  # on a GPU, all skipped means none ran


# ------------------------------------------------------------------------------------------------------- loss


def loss_row_failed(row: dict) -> bool:
    note = row.get("note")
    return bool(note) and not note.startswith(NOT_APPLICABLE)


def stage_loss(ctx: Context) -> str:
    """bench/shared_head_loss.py's method at the profile's sizes; C ascending, both cases per C."""
    import torch

    from bench import shared_head_loss as shl

    p, gpu = ctx.profile, ctx.profile.device == "cuda"
    dtype = "bfloat16" if gpu else "float32"
    if gpu:
        ceilings = shl.measure_ceilings()
        spec = shl.spec_ceilings(torch.cuda.get_device_name(0), torch.bfloat16)
        ctx.record.set(ceilings=ceilings, spec_ceilings=spec)
    else:
        ceilings = None
    method = shl.method_lines(p.loss_rounds, p.loss_runs, p.loss_seconds)
    ctx.record.set(floor_formula=shl.FLOOR_FORMULA, method=method)
    base = {"device": p.device, "dtype": dtype, "providers": list(shl.PROVIDERS), "rounds": p.loss_rounds,
            "runs": p.loss_runs, "warmup": p.loss_warmup, "max_seconds": p.loss_seconds, "threads": None,
            "compile_backend": p.compile_backend}  # fmt: skip
    status = "ok"
    for C in p.loss_C:
        for case in p.loss_cases:
            spec = dict(base, case=case, B=p.loss_B, D=p.loss_D, C=C)
            left = ctx.seconds_left() - 5
            if left < 10:
                ctx.record.add_row(dict(spec, provider="*", note="not run: the stage's time budget was spent"))
                status = "partial"
                continue
            for row in shl.measure_config(spec, ceilings, timeout=left):
                ctx.record.add_row(row)
                status = "partial" if loss_row_failed(row) else status
    return _sampling_rows(ctx, status)


def _sampling_rows(ctx: Context, status: str) -> str:
    """bench/partial_fc_sampling.py at the profile's largest class counts (1 M and 2 M on the GPU), time permitting:
    the head's step at sample rates 1.0 / 0.3 / 0.1, in the loss stage's JSON under ``sampling``."""
    import argparse

    import torch

    from bench import partial_fc_sampling as pfc

    p, rows = ctx.profile, []
    args = argparse.Namespace(B=p.loss_B, D=p.loss_D, rounds=2, runs=2)
    for C in p.loss_C[-2:]:
        if ctx.seconds_left() < 40:
            rows.append({"C": C, "note": "not run: the stage's time budget was spent"})
            status = "partial"
            continue
        try:
            rows += pfc.measure(C, args, torch.device(p.device))
        except torch.OutOfMemoryError:
            rows.append({"C": C, "note": "out of memory"})
            status = "partial"
        ctx.record.set(sampling=rows)
    return status


# ---------------------------------------------------------------------------------------------------- distill


def stage_distill(ctx: Context) -> str:
    """bench/train_step.py's compiled settings: live teacher, teacher cache, student only, then many classes."""
    from bench import train_step as ts

    p = ctx.profile
    dataset = ts.synthetic_faces(p.batch_size, p.image_size, p.identities)
    base = ts.base_config(p.student, p.batch_size, p.steps, p.device)
    teacher = ts.build_teacher(p.teacher, base, dataset)
    settings = ts.default_settings((True,), p.classes)
    ctx.record.set(settings=[s.name for s in settings], autocast="bf16 autocast on CUDA (the loop's own)")
    rows = ts.run_settings(settings, base, dataset, teacher, p.step_warmup, on_row=ctx.record.add_row)
    return "partial" if any("note" in r for r in rows) else "ok"


# ---------------------------------------------------------------------------------------------------- latency


LATENCY_BACKENDS = ("torch", "ort-cpu", "torch-compile")  # of edgekd.export.latency's; compile last: slowest to start


def stage_latency(ctx: Context) -> str:
    """edgekd.export.latency over torch eager, ONNX Runtime CPU and torch.compile (CUDA graphs too on a GPU)."""
    from bench.export_latency import untrained_mbf
    from edgekd.bundle import load_bundle
    from edgekd.export.latency import LatencyConfig, ModelSpec, run_benchmark
    from edgekd.export.passes.onnx import export_onnx, model_metadata, save_onnx

    p, gpu = ctx.profile, ctx.profile.device == "cuda"
    model = load_bundle(untrained_mbf(ctx.work / "model.safetensors", p.latency_model)).backbone
    onnx_path = save_onnx(export_onnx(model, model.cfg, metadata=model_metadata(model.cfg)), ctx.work / "model.onnx")
    spec = ModelSpec(path=None, name=p.latency_model, module=model, onnx=str(onnx_path),
                     input_size=tuple(model.cfg.input_size))  # fmt: skip
    cfg = LatencyConfig(batches=p.batches, warmup_iters=3 if ctx.dry_run else 10,
                        warmup_seconds=0.0 if ctx.dry_run else 0.3, iters=p.latency_iters,
                        min_seconds=p.latency_seconds, device=p.device, cuda_graph=gpu)  # fmt: skip
    ctx.record.set(latency_config=asdict(cfg))
    status = "ok"
    for backend in LATENCY_BACKENDS:
        for row in run_benchmark([spec], [backend], cfg, log=lambda m: print(m, flush=True)):
            ctx.record.add_row(row)
            if row["status"] != "ok" and not row["status"].startswith("skipped"):
                status = "partial"
    return status


STAGE_FUNCTIONS = {
    "environment": stage_environment,
    "gpu_tests": stage_gpu_tests,
    "loss": stage_loss,
    "distill": stage_distill,
    "latency": stage_latency,
}
NEEDS_CUDA = ("gpu_tests", "loss", "distill", "latency")  # outside the dry run


def run_stage(stage: str, out: Path, work: Path, dry_run: bool, budget_s: float, filename: str) -> None:
    """Run one stage in this process and record its outcome; an exception is recorded, then re-raised."""
    profile = DRY if dry_run else GPU
    record = StageRecord(out / filename, stage, dry_run, asdict(profile))
    if dry_run:
        use_light_compiler()
    else:
        import torch

        if stage in NEEDS_CUDA and not torch.cuda.is_available():
            record.finish("skipped: no CUDA device (run with --dry-run on a CPU)")
            return
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(record, profile, dry_run, work, time.monotonic() + budget_s)
    try:
        status = STAGE_FUNCTIONS[stage](ctx)
    except BaseException as exc:
        record.set(error=first_line(exc))
        record.finish("failed")
        raise
    record.finish(status)
