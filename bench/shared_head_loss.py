"""Shared-head loss benchmark: forward+backward time and peak extra memory of every backend.

Providers: the ``reference`` backend in eager mode, ``torch.compile`` of it, the ``chunked`` and ``triton``
backends, and Liger-Kernel's fused linear cross entropy when it is installed (plain-CE case only). Cases:
``plain_ce`` (linear head, ce only) and ``full`` (ArcFace head, ce + kd + th_ce + th_kd, z_st = z_s).

Time is the median (with p20/p80) over ``--runs`` forward+backward steps after warm-up, with CUDA events on a
GPU and ``perf_counter`` on a CPU. Peak extra memory is ``max_memory_allocated`` above the inputs on a GPU; on a
CPU it is the resident-set high-water mark above the inputs (``/proc/self/status`` VmHWM reset via
``/proc/self/clear_refs``) with glibc's mmap threshold fixed at 64 KiB so freed tensors return their pages (the
script re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` set). GPU rows carry the physical floor: the larger of
the minimum GEMM FLOPs (3·2BCD plain CE, 6·2BCD full) at the dtype's dense peak and the minimum bytes (read the
class matrices once, write dW_s once) at HBM bandwidth, from spec-sheet numbers.

    python bench/shared_head_loss.py --device cuda                       # full GPU sweep
    python bench/shared_head_loss.py --device cpu --B 256 --D 128 --C 10000 100000 --runs 5 --write-md
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import platform
import re
import statistics
import sys
import time
from datetime import date
from importlib import metadata
from pathlib import Path

import torch

from edgekd.losses import HeadSpec, LossWeights, shared_head_loss

CASES = {
    "plain_ce": (HeadSpec("linear", 1.0, 0.0), LossWeights(ce=1.0)),
    "full": (HeadSpec("arcface", 64.0, 0.5), LossWeights(ce=1.0, kd=1.0, th_ce=1.0, th_kd=1.0, T=4.0)),
}
GEMMS = {"plain_ce": 3, "full": 6}  # minimum GEMMs of 2·B·C·D FLOPs: forward logits, dz, dW (+ teacher paths)
# Spec-sheet dense peaks (TFLOP/s: 16-bit tensor core, TF32, FP32 non-tensor-core) and HBM bandwidth (TB/s).
GPU_PEAKS = {"H100": (989.0, 494.0, 67.0, 3.35), "H200": (989.0, 494.0, 67.0, 4.8), "A100": (312.0, 156.0, 19.5, 2.0)}
SECTION = "## Shared-head loss"


# ---------------------------------------------------------------------------------------------- measurement


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Peak memory above what was allocated before ``fn()`` ran."""
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


def time_ms(fn, device: torch.device, runs: int, warmup: int, before=lambda: None) -> list[float]:
    """Wall (CPU) or CUDA-event (GPU) milliseconds of ``runs`` calls after ``warmup``; ``before()`` runs untimed."""
    for _ in range(warmup):
        before()
        fn()
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


def floor_ms(case: str, B: int, D: int, C: int, dtype: torch.dtype, device: torch.device) -> float | None:
    """Physical lower bound of one forward+backward on the GPU, from spec-sheet peaks; None when unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peaks = next((v for k, v in GPU_PEAKS.items() if k in name), None)
    if peaks is None:
        return None
    tc16, tf32, fp32, tbps = peaks
    tflops = tc16 if dtype in (torch.float16, torch.bfloat16) else (tf32 if torch.backends.cuda.matmul.allow_tf32
                                                                    else fp32)  # fmt: skip
    flops = GEMMS[case] * 2.0 * B * C * D
    n_mat = 1 if case == "plain_ce" else 2  # W_s (+ W_t) read once
    nbytes = (n_mat + 1) * C * D * torch.finfo(dtype).bits / 8
    return max(flops / (tflops * 1e12), nbytes / (tbps * 1e12)) * 1e3


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


def make_step(provider: str, case: str, x: dict):
    """A closure running one forward+backward, or a string saying why the provider does not apply."""
    head, weights = CASES[case]
    kwargs = {k: x.get(k) for k in ("W_s", "b_s", "W_t", "z_t")}

    def loss(backend):
        return shared_head_loss(x["z_s"], x["labels"], **kwargs, head=head, weights=weights, backend=backend)[0]

    if provider == "liger":
        if case != "plain_ce":
            return "plain CE only"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel not installed"
        if x["z_s"].device.type != "cuda":
            return "GPU only"
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss()
        fn = lambda: flce(x["W_s"], x["z_s"], x["labels"], x["b_s"])  # noqa: E731
    elif provider == "compile":
        compiled = torch.compile(lambda: loss("reference"), fullgraph=True)
        fn = compiled
    elif provider == "triton":
        if x["z_s"].device.type != "cuda":
            return "GPU only (the CPU interpreter is for tests)"
        fn = lambda: loss("triton")  # noqa: E731
    else:
        fn = lambda: loss(provider)  # noqa: E731

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


def write_markdown(path: Path, rows: list[dict], device: torch.device, command: str, runs: int) -> None:
    header = "| case | provider | dtype | B | D | C | median ms | p20–p80 ms | peak extra MiB | floor ms | note |"
    lines = [
        SECTION,
        "",
        f"Forward+backward of one batch, written by `{command}` on {date.today().isoformat()}.",
        f"Machine: {environment(device)}.",
        "",
        f"Median of {runs} runs after warm-up (perf_counter on CPU, CUDA events on GPU). Peak extra",
        "memory: resident-set high-water mark above the inputs, gradients included, with glibc's mmap threshold",
        "fixed at 64 KiB. `plain_ce`: linear head with bias, ce only. `full`: ArcFace head (s=64, m=0.5),",
        "ce + kd + th_ce + th_kd at T=4, z_st = z_s. The CPU is shared with other jobs, so times are noisy, and",
        "one thread is used: with two threads on the oversubscribed host every op waited ~10 ms at OpenMP",
        "barriers, which punished the chunked backend's many block-sized ops. The triton backend runs on a CPU",
        "only in Triton's interpreter (for tests), so it has no CPU rows.",
        "",
        header,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        spread = f"{r['p20']:.1f}–{r['p80']:.1f}" if r.get("median") is not None else ""
        median = f"{r['median']:.1f}" if r.get("median") is not None else ""
        peak = f"{r['peak'] / 2**20:.1f}" if r.get("peak") is not None else ""
        floor = f"{r['floor']:.3f}" if r.get("floor") is not None else "—"
        lines.append(f"| {r['case']} | {r['provider']} | {r['dtype']} | {r['B']} | {r['D']} | {r['C']} | {median} | "
                     f"{spread} | {peak} | {floor} | {r.get('note', '')} |")  # fmt: skip
    lines += [
        "",
        "GPU rows (B ∈ {256, 512, 1024}, D ∈ {128, 512}, C ∈ {10k, 100k, 1M, 2M}, bf16, with the physical floor):",
        "not measured (no GPU lent). Run `python bench/shared_head_loss.py --device cuda --write-md` on one.",
        "",
    ]
    text = path.read_text() if path.exists() else "# Benchmarks\n\nMeasured numbers; each section names the script.\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines)
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + "\n".join(lines) + ("" if nxt < 0 else text[nxt:])
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text.rstrip("\n") + "\n")
    tmp.replace(path)


def measure(provider, case, B, D, C, dtype, device, runs, warmup) -> dict:
    """One table row: time, peak extra memory and floor of a provider, or a note saying why it has none."""
    row = dict(case=case, provider=provider, dtype=str(dtype).removeprefix("torch."), B=B, D=D, C=C,
               floor=floor_ms(case, B, D, C, dtype, device))  # fmt: skip
    if not fits(provider, case, B, D, C, dtype, device):
        return dict(row, note="skipped: does not fit")
    x = make_inputs(case, B, D, C, dtype, device)
    step = make_step(provider, case, x)
    if isinstance(step, str):
        return dict(row, note=step)
    try:
        times = time_ms(step, device, runs, warmup, functools.partial(clear_grads, x))
        q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
        row.update(median=statistics.median(times), p20=q[0], p80=q[3])
        clear_grads(x)  # the gradients count as extra memory
        row["peak"] = peak_extra_bytes(step, device)
    except torch.OutOfMemoryError:
        row["note"] = "out of memory"
    del x, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def print_row(row: dict, device: torch.device) -> None:
    def fmt(v, spec=".3f"):
        return "" if v is None else format(v, spec)

    peak = row.get("peak")
    cells = (row["case"], row["provider"], device.type, row["dtype"], row["B"], row["D"], row["C"],
             fmt(row.get("median")), fmt(row.get("p20")), fmt(row.get("p80")),
             "" if peak is None else f"{peak / 2**20:.1f}", fmt(row["floor"]), row.get("note", ""))  # fmt: skip
    print(",".join(str(c) for c in cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: bf16 GPU, fp32 CPU)")
    parser.add_argument("--B", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--D", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--C", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 2_000_000])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--providers", nargs="+", default=["reference", "compile", "chunked", "triton", "liger"])
    parser.add_argument("--runs", type=int, default=None, help="timed runs (default: 20 GPU, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 3 GPU, 1 CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--write-md", action="store_true", help="rewrite the shared-head section of BENCHMARKS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        # Re-run with a fixed mmap threshold so the RSS high-water mark tracks live tensors (see the docstring).
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    runs = args.runs or (20 if device.type == "cuda" else 5)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    command = "python bench/shared_head_loss.py " + " ".join(sys.argv[1:])
    print(f"# {environment(device)}")
    print("case,provider,device,dtype,B,D,C,median_ms,p20_ms,p80_ms,peak_extra_MiB,floor_ms,note")

    rows = []
    for case in args.cases:
        for B in args.B:
            for D in args.D:
                for C in args.C:
                    for provider in args.providers:
                        row = measure(provider, case, B, D, C, dtype, device, runs, warmup)
                        if device.type == "cpu" and row.get("note", "").startswith(("GPU only", "plain CE only")):
                            continue  # not applicable here: keep the table short
                        rows.append(row)
                        print_row(row, device)
    if args.write_md:
        write_markdown(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", rows, device, command, runs)


if __name__ == "__main__":
    main()
