"""Shared-head loss benchmark: forward+backward time and peak extra memory of every backend.

Providers: the ``reference`` backend in eager mode, ``torch.compile`` of it, the ``chunked`` and ``triton``
backends, and Liger-Kernel's fused linear cross entropy when it is installed (plain-CE case only). Cases:
``plain_ce`` (linear head, ce only) and ``full`` (ArcFace head, ce + kd + th_ce + th_kd, z_st = z_s).

Method. Time and memory come from separate runs, because measuring memory changes what is measured: on a CPU the
peak is the resident-set high-water mark, which tracks live tensors only when glibc's mmap threshold is fixed at
64 KiB (every freed tensor returns its pages), and that setting roughly doubled the chunked backend's time and
flipped which backend won when both were taken in one process. So each (case, B, D, C) runs in worker subprocesses:

- a timing worker with the default allocator holds one set of inputs and every provider, warms each up (compile
  time stays out), then runs ``--rounds`` rounds of ``--runs`` forward+backward steps per provider, the providers
  interleaved round by round (in a rotated order) so that drift on a shared machine hits every provider alike.
  A row's time is the median (p20–p80) over all its steps: CUDA events on a GPU, ``perf_counter`` on a CPU;
- memory: on a CPU a second worker, started with ``MALLOC_MMAP_THRESHOLD_=65536``, measures one step of each
  provider after a warm-up step: VmHWM above VmRSS before the step (reset via ``/proc/self/clear_refs``). On a GPU
  the timing worker measures it after its timing rounds in a separate pass per provider:
  ``torch.cuda.max_memory_allocated`` above ``memory_allocated`` before the step. Gradients count as extra memory.

``torch.compile`` of the reference compiles with the class count C marked dynamic, so one compile (and Inductor's
on-disk graph cache) serves every C of a sweep. GPU rows carry the physical floor, ``FLOOR_FORMULA`` below, from
the matmul rate and memory bandwidth measured at the start of the run (spec-sheet numbers with ``--spec-ceilings``).

    python bench/shared_head_loss.py --device cuda                       # full GPU sweep
    python bench/shared_head_loss.py --device cpu --B 256 --D 128 --C 10000 100000 --threads 1 --write-md
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import date
from importlib import metadata
from pathlib import Path

import torch

from edgekd.heads import HeadSpec
from edgekd.kernels import interpreting
from edgekd.losses import LossWeights, shared_head_loss

CASES = {
    "plain_ce": (HeadSpec("linear", 1.0, 0.0), LossWeights(ce=1.0)),
    "full": (HeadSpec("arcface", 64.0, 0.5), LossWeights(ce=1.0, kd=1.0, th_ce=1.0, th_kd=1.0, T=4.0)),
}
PROVIDERS = ("reference", "compile", "chunked", "triton", "liger")
# Minimum GEMMs of 2·B·C·D FLOPs each. plain_ce: logits, dz, dW. full: student, shared-head and teacher logits,
# dz through both heads, dW_s.
GEMMS = {"plain_ce": 3, "full": 6}
# Class matrices of C·D elements that must cross memory once. plain_ce: read W_s, write dW_s. full: + read W_t.
MATRICES = {"plain_ce": 2, "full": 3}
# Spec-sheet dense peaks (TFLOP/s: 16-bit tensor core, TF32, FP32 non-tensor-core) and HBM bandwidth (TB/s).
GPU_PEAKS = {"H100": (989.0, 494.0, 67.0, 3.35), "H200": (989.0, 494.0, 67.0, 4.8), "A100": (312.0, 156.0, 19.5, 2.0)}
FLOOR_FORMULA = (
    "floor = max(G · 2·B·C·D / F, N · C·D · bytes / BW): G = 3 GEMMs for plain_ce (logits, dz, dW) and 6 for full "
    "(student, shared-head and teacher logits; dz through both heads; dW_s); N = 2 class matrices crossing memory "
    "once for plain_ce (read W_s, write dW_s) and 3 for full (also read W_t); F the dense 16-bit matmul rate, BW the "
    "memory bandwidth"
)
SECTION = "## Shared-head loss"
RESULT_PREFIX = "RESULT "


# ---------------------------------------------------------------------------------------------- measurement


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Peak memory above what was allocated before ``fn()`` ran (see the module docstring for the CPU caveat)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _rss("VmRSS")
    fn()
    return _rss("VmHWM") - base


def time_ms(fn, device: torch.device, runs: int, before=lambda: None) -> list[float]:
    """Wall (CPU) or CUDA-event (GPU) milliseconds of ``runs`` calls of ``fn``; ``before()`` runs untimed."""
    times = []
    for _ in range(runs):
        before()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def rotated(items: list, r: int) -> list:
    """``items`` starting at position ``r`` (mod its length): round ``r``'s provider order."""
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


# ---------------------------------------------------------------------------------------------------- floor


def spec_ceilings(gpu_name: str, dtype: torch.dtype, tf32: bool = False) -> dict | None:
    """Spec-sheet matmul rate for ``dtype`` and HBM bandwidth of a known GPU, or None."""
    peaks = next((v for k, v in GPU_PEAKS.items() if k in gpu_name), None)
    if peaks is None:
        return None
    tc16, tf32_rate, fp32, tbps = peaks
    tflops = tc16 if dtype in (torch.float16, torch.bfloat16) else (tf32_rate if tf32 else fp32)
    return {"tflops": tflops, "tbps": tbps, "source": f"spec sheet ({gpu_name})"}


def _median_event_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return statistics.median(time_ms(fn, torch.device("cuda"), reps))


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 matmul rate: an n³ ``torch.matmul`` on random data, median of ``reps`` after 3 warm-ups."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / (_median_event_ms(lambda: torch.matmul(a, b), reps) * 1e-3) / 1e12


def copy_tbps(nbytes: int = 2**30, reps: int = 10) -> float:
    """Measured device memory bandwidth: a device-to-device copy of ``nbytes``, bytes read plus written."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (_median_event_ms(lambda: dst.copy_(src), reps) * 1e-3) / 1e12


def measure_ceilings(reps: int = 10) -> dict:
    """The two ceilings of ``FLOOR_FORMULA`` measured on this GPU (the rates a floor can honestly use)."""
    ceilings = {"tflops": matmul_tflops(reps=reps), "tbps": copy_tbps(reps=reps)}
    torch.cuda.empty_cache()
    return dict(ceilings, source=f"measured: 8192³ bf16 matmul, 1 GiB device copy (read + write), median of {reps}")


def floor_ms(case: str, B: int, D: int, C: int, dtype: torch.dtype, ceilings: dict | None) -> float | None:
    """``FLOOR_FORMULA`` in milliseconds for one forward+backward; None without ceilings (CPU rows)."""
    if ceilings is None:
        return None
    flops = GEMMS[case] * 2.0 * B * C * D
    nbytes = MATRICES[case] * C * D * torch.finfo(dtype).bits / 8
    return max(flops / (ceilings["tflops"] * 1e12), nbytes / (ceilings["tbps"] * 1e12)) * 1e3


# ------------------------------------------------------------------------------------------------ providers


def make_inputs(case: str, B: int, D: int, C: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)  # noqa: E731
    x = {"z_s": rand(B, D).requires_grad_(), "W_s": rand(C, D, scale=0.05).requires_grad_()}
    x["labels"] = torch.randint(0, C, (B,), generator=g, device=device)
    if case == "plain_ce":
        x["b_s"] = rand(C).requires_grad_()
    else:
        x["W_t"], x["z_t"] = rand(C, D, scale=0.05), rand(B, D)
    return x


def loss_args(x: dict) -> tuple:
    """Positional arguments of ``loss_of``: the inputs, None where a case has none."""
    return tuple(x.get(k) for k in ("z_s", "labels", "W_s", "b_s", "W_t", "z_t"))


def loss_of(case: str, backend: str):
    """``loss(z_s, labels, W_s, b_s, W_t, z_t) -> total`` of one backend on one case."""
    head, weights = CASES[case]

    def loss(z_s, labels, W_s, b_s, W_t, z_t):
        return shared_head_loss(z_s, labels, W_s=W_s, b_s=b_s, W_t=W_t, z_t=z_t, head=head, weights=weights,
                                backend=backend)[0]  # fmt: skip

    return loss


def compiled_reference(case: str, x: dict, compile_backend: str):
    """``torch.compile(fullgraph=True)`` of the reference loss, the class count marked dynamic on every C-sized input.

    The inputs are arguments (not closure variables) so the dynamic marks apply; Dynamo may still specialize
    (``maybe_mark_dynamic`` does not insist).
    """
    for name in ("W_s", "b_s", "W_t"):
        if x.get(name) is not None:
            torch._dynamo.maybe_mark_dynamic(x[name], 0)
    return torch.compile(loss_of(case, "reference"), fullgraph=True, backend=compile_backend)


def liger_loss(x: dict):
    """Liger-Kernel's fused linear cross entropy (its defaults) on the plain-CE inputs."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    flce = LigerFusedLinearCrossEntropyLoss()
    return lambda: flce(x["W_s"], x["z_s"], x["labels"], x["b_s"])


def make_step(provider: str, case: str, x: dict, compile_backend: str = "inductor"):
    """A closure running one forward+backward, or a string saying why the provider does not apply."""
    device = x["z_s"].device
    if provider == "liger":
        if case != "plain_ce":
            return "plain CE only"
        if importlib.util.find_spec("liger_kernel") is None:
            return "not installed"
        if device.type != "cuda":
            return "GPU only"
        fn = liger_loss(x)
    elif provider == "triton" and device.type != "cuda" and not interpreting():
        return "GPU only (the CPU runs it only in Triton's interpreter, for tests)"
    elif provider == "compile":
        compiled = compiled_reference(case, x, compile_backend)
        fn = lambda: compiled(*loss_args(x))  # noqa: E731
    else:
        loss = loss_of(case, provider)
        fn = lambda: loss(*loss_args(x))  # noqa: E731

    def step():
        fn().backward()

    return step


def clear_grads(x: dict) -> None:
    for k in ("z_s", "W_s", "b_s"):
        if k in x:
            x[k].grad = None


def fits(provider: str, case: str, B: int, D: int, C: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Rough check that inputs plus the provider's transient memory fit in half the free memory."""
    item = torch.finfo(dtype).bits // 8
    inputs = (2 if case == "plain_ce" else 3) * C * D * item
    logits = B * C * 4 * (3 if case == "plain_ce" else 12) if provider in ("reference", "compile") else 0
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        with open("/proc/meminfo") as f:
            free = int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024
    return inputs + logits < 0.5 * free


# ---------------------------------------------------------------------------------------------------- worker


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _ready_steps(spec: dict, x: dict, device: torch.device) -> tuple[dict, dict]:
    """Each provider's step, or its note when it does not apply, does not fit or fails to build."""
    steps, notes = {}, {}
    dtype = getattr(torch, spec["dtype"])
    for provider in spec["providers"]:
        if not fits(provider, spec["case"], spec["B"], spec["D"], spec["C"], dtype, device):
            notes[provider] = "skipped: does not fit"
            continue
        try:
            step = make_step(provider, spec["case"], x, spec.get("compile_backend", "inductor"))
        except Exception as exc:  # a provider that cannot be built is a row note, not the end of the sweep
            step = f"failed: {_first_line(exc)}"
        if isinstance(step, str):
            notes[provider] = step
        else:
            steps[provider] = step
    return steps, notes


def _warm_up(steps: dict, notes: dict, x: dict, warmup: int) -> tuple[dict, dict]:
    """Run each step ``warmup`` times (compilation happens here); drop the ones that fail.

    Returns the seconds all warm-up steps took and the seconds of the last one (the step time to plan rounds by).
    """
    total, last = {}, {}
    sync = torch.cuda.synchronize if x["z_s"].is_cuda else (lambda: None)
    for provider in list(steps):
        t0 = time.perf_counter()
        try:
            for _ in range(max(1, warmup)):
                clear_grads(x)
                t_last = time.perf_counter()
                steps[provider]()
                sync()
        except Exception as exc:
            notes[provider] = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else _first_line(exc)
            del steps[provider]
            if x["z_s"].is_cuda:
                torch.cuda.empty_cache()
            continue
        total[provider] = round(time.perf_counter() - t0, 2)
        last[provider] = time.perf_counter() - t_last
    return total, last


def runs_per_round(step_s: float, rounds: int, runs: int, max_seconds: float | None) -> int:
    """``runs``, or fewer (at least 1) so that ``rounds`` rounds of a provider take about ``max_seconds``."""
    if not max_seconds or step_s <= 0:
        return runs
    return max(1, min(runs, int(max_seconds / (rounds * step_s))))


def _timing_rounds(steps: dict, notes: dict, x: dict, device: torch.device, rounds: int, runs: dict) -> dict:
    """Per-provider millisecond samples of ``rounds`` interleaved rounds of ``runs[provider]`` steps each."""
    samples = {p: [] for p in steps}
    for r in range(rounds):
        for provider in rotated(list(samples), r):
            if provider in notes:
                continue
            try:
                samples[provider] += time_ms(steps[provider], device, runs[provider], lambda: clear_grads(x))
            except Exception as exc:
                notes[provider] = _first_line(exc)
    return {p: s for p, s in samples.items() if p not in notes}


def _memory_pass(steps: dict, notes: dict, x: dict, device: torch.device) -> dict:
    """Peak extra bytes of one step per provider, each provider already warmed up."""
    peaks = {}
    for provider, step in steps.items():
        if provider in notes:
            continue
        clear_grads(x)  # the gradients count as extra memory
        try:
            peaks[provider] = peak_extra_bytes(step, device)
        except Exception as exc:
            notes[provider] = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else _first_line(exc)
    return peaks


def worker(kinds: set[str], spec: dict) -> dict:
    """Run in a subprocess: time and/or memory of every provider on one (case, B, D, C). Returns per-provider
    ``{"samples": [...], "warmup_s": s}``, ``{"peak": bytes}`` or ``{"note": why}``.

    ``spec["max_seconds"]`` (optional) caps a provider's timing rounds at about that many seconds by running fewer
    steps per round (at least one), so a slow provider does not take a GPU run's time budget.
    """
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    x = make_inputs(spec["case"], spec["B"], spec["D"], spec["C"], dtype, device)
    steps, notes = _ready_steps(spec, x, device)
    warm, step_s = _warm_up(steps, notes, x, spec["warmup"] if "time" in kinds else 1)
    runs = {p: runs_per_round(s, spec["rounds"], spec["runs"], spec.get("max_seconds")) for p, s in step_s.items()}
    samples = _timing_rounds(steps, notes, x, device, spec["rounds"], runs) if "time" in kinds else {}
    peaks = _memory_pass(steps, notes, x, device) if "memory" in kinds else {}
    out = {}
    for provider in spec["providers"]:
        if provider in notes:
            out[provider] = {"note": notes[provider]}
            continue
        out[provider] = {"warmup_s": warm.get(provider)}
        if provider in samples:
            out[provider]["samples"] = samples[provider]
        if provider in peaks:
            out[provider]["peak"] = peaks[provider]
    return out


def run_worker(kinds: str, spec: dict, env: dict | None = None, timeout: float | None = None) -> dict:
    """``worker`` in a fresh Python process; on a crash every provider gets a note with the reason."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kinds, "--spec", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {p: {"note": f"{kinds} worker timed out after {timeout:.0f} s"} for p in spec["providers"]}
    sys.stderr.write(out.stderr)
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {p: {"note": f"{kinds} worker failed (exit {out.returncode}): {tail}"} for p in spec["providers"]}
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def measure_config(spec: dict, ceilings: dict | None = None, timeout: float | None = None) -> list[dict]:
    """One row per provider for one (case, B, D, C): time and memory from separate runs (module docstring)."""
    if spec["device"].startswith("cuda"):
        timed = memory = run_worker("time,memory", spec, timeout=timeout)
    else:
        timed = run_worker("time", spec, timeout=timeout)
        memory = run_worker("memory", spec, dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"), timeout)
    dtype = getattr(torch, spec["dtype"])
    floor = floor_ms(spec["case"], spec["B"], spec["D"], spec["C"], dtype, ceilings)
    rows = []
    for provider in spec["providers"]:
        row = dict(case=spec["case"], provider=provider, device=spec["device"], dtype=spec["dtype"], B=spec["B"],
                   D=spec["D"], C=spec["C"], floor=floor, rounds=spec["rounds"])  # fmt: skip
        t, m = timed.get(provider, {}), memory.get(provider, {})
        samples = t.get("samples")
        if samples:
            q = statistics.quantiles(samples, n=5) if len(samples) > 1 else samples * 4
            row.update(median=statistics.median(samples), p20=q[0], p80=q[3], steps_timed=len(samples),
                       warmup_s=t.get("warmup_s"))  # fmt: skip
        row["peak"] = m.get("peak")
        note = t.get("note") or m.get("note")
        if note:
            row["note"] = note
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ reporting


def environment(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        name += f", torch threads={torch.get_num_threads()}"
    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = "not installed"
    return f"{name}; torch {torch.__version__}, triton {triton}, python {platform.python_version()}"


def method_lines(rounds: int, runs: int, max_seconds: float | None = None) -> list[str]:
    """The paragraph saying how the table was measured (shared with bench/gpu_check.py)."""
    cap = f" (fewer, at least 1, where {rounds} rounds would take over {max_seconds:g} s)" if max_seconds else ""
    return [
        f"Time: median (p20–p80) of {rounds} rounds × {runs} forward+backward steps per provider{cap} after warm-up,",
        "the providers interleaved round by round in one timing process (perf_counter on CPU, CUDA events on GPU).",
        "Peak extra memory comes from a separate run: on CPU a second process with glibc's mmap threshold fixed at",
        "64 KiB (resident-set high-water mark above the inputs), on GPU a separate pass after the timing rounds",
        "(`max_memory_allocated` above the inputs); gradients included. `plain_ce`: linear head with bias, ce only.",
        "`full`: ArcFace head (s=64, m=0.5), ce + kd + th_ce + th_kd at T=4, z_st = z_s. `compile` is",
        "`torch.compile(fullgraph=True)` of the reference with C marked dynamic. `liger`: Liger-Kernel's",
        "`LigerFusedLinearCrossEntropyLoss` with its defaults (plain CE only).",
    ]


def table_lines(rows: list[dict]) -> list[str]:
    lines = [
        "| case | provider | dtype | B | D | C | median ms | p20–p80 ms | peak extra MiB | floor ms | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        timed = r.get("median") is not None
        median = f"{r['median']:.3f}" if timed else ""
        spread = f"{r['p20']:.3f}–{r['p80']:.3f}" if timed else ""
        peak = f"{r['peak'] / 2**20:.1f}" if r.get("peak") is not None else ""
        floor = f"{r['floor']:.3f}" if r.get("floor") is not None else "—"
        lines.append(f"| {r['case']} | {r['provider']} | {r['dtype']} | {r['B']} | {r['D']} | {r['C']} | {median} | "
                     f"{spread} | {peak} | {floor} | {r.get('note', '')} |")  # fmt: skip
    return lines


def write_markdown(path: Path, rows: list[dict], device: torch.device, command: str, spec: dict) -> None:
    from markdown_section import merge_section

    lines = [
        SECTION,
        "",
        f"Forward+backward of one batch, written by `{command}` on {date.today().isoformat()}.",
        f"Machine: {environment(device)}.",
        "",
        *method_lines(spec["rounds"], spec["runs"], spec["max_seconds"]),
        "The triton backend runs on a CPU only in Triton's interpreter (for tests), so it has no CPU rows. On a",
        "shared CPU use --threads 1: with two threads on an oversubscribed host every op waited ~10 ms at OpenMP",
        "barriers (seen 2026-11-24), which punished the chunked backend's many block-sized ops.",
        "",
        *table_lines(rows),
        "",
        "GPU rows (B = 512, D = 512, C ∈ {100k, 1M, 2M}, bf16, with the physical floor): `make gpu-check` on a GPU",
        "machine writes them (bench/gpu_check.py).",
        "",
    ]
    merge_section(path, SECTION, lines)


def print_row(row: dict) -> None:
    def fmt(v, spec=".3f"):
        return "" if v is None else format(v, spec)

    peak = row.get("peak")
    cells = (row["case"], row["provider"], row["device"], row["dtype"], row["B"], row["D"], row["C"],
             fmt(row.get("median")), fmt(row.get("p20")), fmt(row.get("p80")),
             "" if peak is None else f"{peak / 2**20:.1f}", fmt(row["floor"]), row.get("note", ""))  # fmt: skip
    print(",".join(str(c) for c in cells), flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: bf16 GPU, fp32 CPU)")
    parser.add_argument("--B", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--D", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--C", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 2_000_000])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default: 5 GPU, 3 CPU)")
    parser.add_argument("--runs", type=int, default=None, help="timed steps per round (default: 5 GPU, 2 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 GPU, 1 CPU)")
    parser.add_argument("--max-seconds", type=float, default=None, help="cap each provider's timing at about this")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile row")
    parser.add_argument("--spec-ceilings", action="store_true", help="GPU floor from spec-sheet peaks, not measured")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--write-md", action="store_true", help="rewrite the shared-head section of BENCHMARKS.md")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: time and/or memory
    parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def base_spec(args: argparse.Namespace, device: torch.device) -> dict:
    """Settings shared by every (case, B, D, C) of a sweep."""
    gpu = device.type == "cuda"
    return {
        "device": str(device),
        "dtype": args.dtype or ("bfloat16" if gpu else "float32"),
        "providers": [p for p in args.providers if gpu or p != "liger"],  # liger is GPU only: keep CPU tables short
        "rounds": args.rounds or (5 if gpu else 3),
        "runs": args.runs or (5 if gpu else 2),
        "warmup": args.warmup if args.warmup is not None else (3 if gpu else 1),
        "max_seconds": args.max_seconds,
        "threads": args.threads,
        "compile_backend": args.compile_backend,
    }


def main() -> None:
    args = parse_args()
    if args.worker:
        result = worker(set(args.worker.split(",")), json.loads(args.spec))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = base_spec(args, device)
    dtype = getattr(torch, spec["dtype"])
    ceilings = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        ceilings = spec_ceilings(name, dtype) if args.spec_ceilings else measure_ceilings()
    print(f"# {environment(device)}")
    if ceilings:
        print(f"# ceilings: {ceilings['tflops']:.0f} TFLOP/s, {ceilings['tbps']:.2f} TB/s ({ceilings['source']})")
    print("case,provider,device,dtype,B,D,C,median_ms,p20_ms,p80_ms,peak_extra_MiB,floor_ms,note")
    rows = []
    for case in args.cases:
        for B in args.B:
            for D in args.D:
                for C in args.C:
                    for row in measure_config(dict(spec, case=case, B=B, D=D, C=C), ceilings):
                        rows.append(row)
                        print_row(row)
    if args.json:
        args.json.write_text(json.dumps({"ceilings": ceilings, "rows": rows}, indent=1) + "\n")
    if args.write_md:
        command = "python bench/shared_head_loss.py " + " ".join(sys.argv[1:])
        path = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
        write_markdown(path, rows, device, command, spec)


if __name__ == "__main__":
    main()
