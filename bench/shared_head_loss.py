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

The providers and their steps are in shared_head_loss_providers.py, what a worker process runs in
shared_head_loss_worker.py; this file holds the floor, the sweep and its output.

    python -m bench.shared_head_loss --device cuda                       # full GPU sweep
    python -m bench.shared_head_loss --device cpu --B 256 --D 128 --C 10000 100000 --threads 1 --write-md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import date
from importlib import metadata
from pathlib import Path

import torch

from bench.shared_head_loss_providers import CASES, PROVIDERS
from bench.shared_head_loss_worker import time_ms, worker

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
ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "


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


# --------------------------------------------------------------------------------------------------- workers


def run_worker(kinds: str, spec: dict, env: dict | None = None, timeout: float | None = None) -> dict:
    """``worker`` in a fresh Python process (``python -m bench.shared_head_loss --worker`` from the repository root);
    on a crash every provider gets a note with the reason."""
    cmd = [sys.executable, "-m", "bench.shared_head_loss", "--worker", kinds, "--spec", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
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
    from bench.markdown_section import merge_section

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
        command = "python -m bench.shared_head_loss " + " ".join(sys.argv[1:])
        path = ROOT / "BENCHMARKS.md"
        write_markdown(path, rows, device, command, spec)


if __name__ == "__main__":
    main()
