"""The stages of bench/gpu_check.py. Each runs in its own process (``python bench/gpu_check.py --stage NAME``) and
rewrites its JSON file after every result, so a stage that fails or runs out of time still leaves what it measured.

A stage's JSON: ``stage``, ``status`` (``running`` until it ends; then ``ok``, ``partial`` when some rows or tests
failed, or ``skipped``), ``dry_run``, ``config`` (the sizes), ``rows`` and stage-specific keys.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("environment", "gpu_tests", "loss", "distill", "latency")
GPU_TEST_PATHS = ("tests/losses", "tests/kernels", "tests/distributed")
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


GPU = Profile(
    device="cuda", loss_B=512, loss_D=512, loss_C=(100_000, 1_000_000, 2_000_000), loss_cases=("plain_ce", "full"),
    loss_rounds=5, loss_runs=4, loss_warmup=2, loss_seconds=2.0, compile_backend="inductor",
    student="mbf", teacher="r50", batch_size=256, image_size=112, identities=16, steps=12, step_warmup=4,
    classes=(100_000, 1_000_000), latency_model="mbf", batches=(1, 8, 64), latency_iters=50, latency_seconds=0.5,
)  # fmt: skip
DRY = Profile(
    device="cpu", loss_B=8, loss_D=16, loss_C=(64,), loss_cases=("full",),
    loss_rounds=2, loss_runs=1, loss_warmup=1, loss_seconds=10.0, compile_backend="aot_eager",
    student="cnn_tiny", teacher="r_tiny", batch_size=8, image_size=32, identities=4, steps=3, step_warmup=1,
    classes=(1000,), latency_model="cnn_tiny", batches=(1, 2), latency_iters=3, latency_seconds=0.0,
)  # fmt: skip


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


def as_text(output: bytes | str | None) -> str:
    """Captured output as text (``TimeoutExpired`` keeps bytes even from a text-mode run)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------ environment


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def nvidia_smi() -> dict | None:
    """Name, driver, memory and clocks from ``nvidia-smi`` (None where it is missing or fails)."""
    fields = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "power.limit", "pstate")
    cmd = ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields, values, strict=False))


def stage_environment(ctx: Context) -> str:
    import torch

    import edgekd.kernels
    from edgekd.utils.env import environment, source_commit

    env = environment(
        edgekd_kernels=edgekd.kernels.__file__,  # which edgekd the stages import (installed, or the tree's links)
        nvidia_smi=nvidia_smi(),
        liger_kernel=package_version("liger-kernel") or "not installed",
        git_commit=source_commit(ROOT),
        python_executable=sys.executable,
        machine=platform.machine(),
        triton_interpret=os.environ.get("TRITON_INTERPRET"),
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
    )
    if torch.cuda.is_available():
        env["gpu"]["multiprocessors"] = torch.cuda.get_device_properties(0).multi_processor_count
    ctx.record.set(environment=env)
    return "ok"


# -------------------------------------------------------------------------------------------------- gpu tests


def parse_junit(path: Path) -> dict:
    """Counts and one entry per test case (outcome, seconds, first line of the failure, recorded properties)."""
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                text = (child.get("message") or child.text or "").strip()
                message = text.splitlines()[0][:300] if text else ""
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0.0), "message": message, "properties": props})  # fmt: skip
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": cases}


def pytest_workers(dry_run: bool) -> list[str]:
    """``-n 8`` where pytest-xdist is installed (the GPU image has it): most of this stage is compiling Triton kernel
    variants, which parallel processes do side by side; nothing where the tests only skip (the dry run)."""
    return ["-n", "8"] if not dry_run and importlib.util.find_spec("xdist") is not None else []


def stage_gpu_tests(ctx: Context) -> str:
    """``pytest -m gpu`` over the loss and kernel tests; they skip themselves without CUDA (the dry run)."""
    junit = ctx.work / "junit.xml"
    # Run from the scratch folder with absolute paths: the repository root on sys.path (python -m puts the current
    # folder there) would let its edgekd/, which lacks the side folders, shadow the importable edgekd.
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", f"--rootdir={ROOT}",
           "-o", "junit_family=xunit1", f"--junitxml={junit}", *pytest_workers(ctx.dry_run),
           *(str(ROOT / p) for p in GPU_TEST_PATHS)]  # fmt: skip
    ctx.record.set(command=f"pytest -m gpu {' '.join(pytest_workers(ctx.dry_run) + list(GPU_TEST_PATHS))}")
    try:
        timeout = max(10.0, ctx.seconds_left() - 10)
        out = subprocess.run(cmd, cwd=ctx.work, capture_output=True, text=True, timeout=timeout)
        rc, output = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as exc:
        rc, output = None, as_text(exc.stdout) + as_text(exc.stderr)  # pytest was killed: keep what it printed
    print(output, flush=True)
    results = parse_junit(junit) if junit.is_file() else {"counts": None, "tests": []}
    ctx.record.set(pytest_exit=rc, output_tail=output[-3000:], **results)
    if rc is None:
        return "timeout"
    counts = results["counts"] or {}
    if rc != 0 or counts.get("failed") or counts.get("error"):
        return "partial"
    return "ok" if ctx.dry_run or counts.get("passed") else "partial"  # on a GPU, all skipped means none ran


# ------------------------------------------------------------------------------------------------------- loss


def loss_row_failed(row: dict) -> bool:
    note = row.get("note")
    return bool(note) and not note.startswith(NOT_APPLICABLE)


def stage_loss(ctx: Context) -> str:
    """bench/shared_head_loss.py's method at the profile's sizes; C ascending, both cases per C."""
    import shared_head_loss as shl
    import torch

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
    return status


# ---------------------------------------------------------------------------------------------------- distill


def stage_distill(ctx: Context) -> str:
    """bench/train_step.py's compiled settings: live teacher, teacher cache, student only, then many classes."""
    import train_step as ts

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
    from export_latency import untrained_mbf

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
