"""The ``benchmark-latency`` engine: timed runs of every backend over a batch sweep, statistics, JSON and a plot.

Method (reference/export.md §5):

- Warm-up runs until both ``warmup_iters`` runs *and* ``warmup_seconds`` have passed (first-run costs: compilation,
  cuDNN/TensorRT tactic choice, ORT's conv algorithm search, lazy loading).
- Measurement runs until both ``iters`` runs and ``min_seconds`` have passed (capped at ``max_iters``).
- CPU: each run is timed on the host (``time.perf_counter_ns``); the input is already in memory.
- CUDA: *device time* is measured with CUDA events around the launch of one inference on staged device buffers (no
  copies, one synchronization at the end), and *end-to-end time* separately on the host around copy-in, inference,
  copy-out and synchronization from pinned memory. Torch backends are also run as a captured CUDA graph.
- Reported per configuration: min, mean, median, p90, p95, p99, max, std (ms per batch) and throughput
  (items/s = batch x runs / total time). A percentile is reported only when enough runs lie above it to mean
  anything: p90 from 10 runs, p95 from 20, p99 from 100 (``PERCENTILE_MIN_RUNS``); below that it is None in the JSON
  and "-" in the table. The default ``iters`` (100) is enough for all three.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgekd.atomic import atomic_path
from edgekd.errors import EdgekdError, MissingDependency
from edgekd.export.runtimes import BACKENDS, file_kind, open_runtime, ort_cuda_available

__all__ = [
    "LATENCY_BACKENDS",
    "LatencyConfig",
    "stats_ms",
    "time_cpu",
    "time_cuda",
    "ModelSpec",
    "run_benchmark",
    "format_latency_table",
    "plot_results",
    "RESULT_FIELDS",
]

LATENCY_BACKENDS = tuple(name for name, backend in BACKENDS.items() if backend.timed)
RESULT_FIELDS = (
    "model", "model_sha256", "backend", "precision", "device", "batch", "threads", "warmup_iters", "warmup_seconds",
    "iters", "seconds", "cuda_graph", "include_transfers", "status", "latency_ms", "throughput_items_per_s",
    "device_ms", "e2e_ms",
)  # fmt: skip
STAT_KEYS = ("min", "mean", "median", "p90", "p95", "p99", "max", "std")
# a p-th percentile needs at least 100 / (100 - p) runs, i.e. one run above it, to be more than the maximum
PERCENTILE_MIN_RUNS = {"p90": 10, "p95": 20, "p99": 100}
DEFAULT_ITERS = PERCENTILE_MIN_RUNS["p99"]


@dataclass
class LatencyConfig:
    """Timing settings (see the module docstring)."""

    batches: tuple[int, ...] = (1, 8)
    warmup_iters: int = 10
    warmup_seconds: float = 0.5
    iters: int = DEFAULT_ITERS
    min_seconds: float = 2.0
    max_iters: int = 10_000
    threads: int | None = None
    device: str = "cpu"
    cuda_graph: bool = True
    seed: int = 0
    ort_cpu_rewrites: bool = True  # ONNX Runtime CPU: OrtRuntime's load-time graph rewrites


def stats_ms(samples_ns: Sequence[int] | np.ndarray) -> dict[str, float | None]:
    """Latency statistics in milliseconds of per-run samples given in nanoseconds; a percentile with fewer runs than
    ``PERCENTILE_MIN_RUNS`` asks for is None."""
    a = np.asarray(samples_ns, dtype=np.float64) / 1e6
    if a.size == 0:
        raise EdgekdError("no timing samples")
    stats: dict[str, float | None] = {
        "min": float(a.min()), "mean": float(a.mean()), "median": float(np.median(a)),
        "max": float(a.max()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
    }  # fmt: skip
    for key, runs in PERCENTILE_MIN_RUNS.items():
        stats[key] = float(np.percentile(a, float(key[1:]))) if a.size >= runs else None
    return {key: stats[key] for key in STAT_KEYS}


def _warm(fn: Callable[[], Any], iters: int, seconds: float, sync: Callable[[], None] | None = None) -> int:
    start, n = time.perf_counter(), 0
    while n < iters or time.perf_counter() - start < seconds:
        fn()
        n += 1
        if sync is not None:
            sync()
    return n


def time_cpu(fn: Callable[[], Any], cfg: LatencyConfig) -> tuple[np.ndarray, int]:
    """Warm up, then time ``fn`` run by run on the host. Returns (samples in ns, warm-up runs)."""
    warm = _warm(fn, cfg.warmup_iters, cfg.warmup_seconds)
    samples: list[int] = []
    start = time.perf_counter()
    while len(samples) < cfg.max_iters and (len(samples) < cfg.iters or time.perf_counter() - start < cfg.min_seconds):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return np.asarray(samples), warm


def time_cuda(step: Callable[[], Any], stream: torch.cuda.Stream, cfg: LatencyConfig) -> tuple[np.ndarray, int]:
    """Device time of ``step`` (which enqueues one inference on ``stream``) by CUDA events; one sync at the end."""
    warm = _warm(step, cfg.warmup_iters, cfg.warmup_seconds, sync=stream.synchronize)
    pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    start = time.perf_counter()
    with torch.cuda.stream(stream):
        while len(pairs) < cfg.max_iters and (len(pairs) < cfg.iters or time.perf_counter() - start < cfg.min_seconds):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(stream)
            step()
            end.record(stream)
            pairs.append((begin, end))
            if len(pairs) % 256 == 0:  # bound the queue so the host timer above stays meaningful
                stream.synchronize()
    stream.synchronize()
    return np.asarray([int(b.elapsed_time(e) * 1e6) for b, e in pairs]), warm


@dataclass
class ModelSpec:
    """A model to benchmark: ``path`` (checkpoint, ``.onnx``, ``.plan`` or ``.pte``) or an in-memory module."""

    path: str | None
    name: str
    module: torch.nn.Module | None = None
    onnx: str | None = None  # an ONNX twin for the ORT backends (exported on the fly for checkpoints)
    precision: str = "fp32"
    sha256: str | None = None
    input_size: tuple[int, int, int] | None = None
    fixed_batch: int | None = None  # the batch a fixed-shape graph takes; only that batch is timed
    notes: list[str] = field(default_factory=list)


def _result(spec: ModelSpec, backend: str, batch: int, cfg: LatencyConfig, **kw) -> dict[str, Any]:
    row = {key: None for key in RESULT_FIELDS}
    row.update(
        model=spec.name,
        model_sha256=spec.sha256,
        backend=backend,
        precision=spec.precision,
        device=_device_of(backend, cfg),
        batch=batch,
        threads=cfg.threads or torch.get_num_threads(),
        warmup_iters=0,
        warmup_seconds=0.0,
        iters=0,
        seconds=0.0,
        cuda_graph=False,
        include_transfers=False,
        status="ok",
    )
    row.update(kw)
    return row


# what a backend runs (a ``FILE_KINDS`` key) -> why a model without one is skipped
_NEEDS = {
    "checkpoint": "needs a checkpoint (torch backends do not run ONNX files or engines)",
    "onnx": "needs an ONNX model",
    "engine": "needs a TensorRT .plan (edgekd export --trt)",
    "executorch": "needs an ExecuTorch .pte (edgekd export --target executorch)",
}
# kinds of model file whose graph may fix the batch: only that batch is timed
_FIXED_BATCH_KINDS = ("onnx", "executorch")


def _source(spec: ModelSpec, backend: str) -> torch.nn.Module | str | None:
    """What ``backend`` runs of ``spec``: the module, the ONNX twin or the engine file; None when it has none."""
    runs = BACKENDS[backend].runs
    if runs == "checkpoint":
        return spec.module
    if runs == "onnx":
        return spec.onnx
    return spec.path if spec.path is not None and file_kind(spec.path) == runs else None


def _applicable(spec: ModelSpec, backend: str) -> bool:
    """Whether ``backend`` can take this kind of model at all (availability aside)."""
    return _source(spec, backend) is not None


def _device_of(backend: str, cfg: LatencyConfig) -> str:
    return BACKENDS[backend].device or cfg.device


def _open(spec: ModelSpec, backend: str, cfg: LatencyConfig, cuda_graph: bool):
    """The Runtime for ``spec`` on ``backend`` (one of ``LATENCY_BACKENDS``), or a skip reason (str). ``cfg.threads``
    sizes ONNX Runtime's intra-op threads and ExecuTorch's thread pool alike."""
    source = _source(spec, backend)
    if source is None:
        return _NEEDS[BACKENDS[backend].runs]
    if backend == "torch-compile" and cfg.device == "cpu" and not _have_cxx():
        return "torch.compile on CPU needs a C++ compiler (none found)"
    if backend == "ort-cuda" and not ort_cuda_available():
        return "no CUDA device for ONNX Runtime"
    return open_runtime(
        source,
        backend,
        device=cfg.device,
        threads=cfg.threads,
        precision=spec.precision,
        cuda_graph=cuda_graph,
        cpu_rewrites=cfg.ort_cpu_rewrites,
    )


def _have_cxx() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++"))


def _measure(runtime, spec: ModelSpec, backend: str, batch: int, cfg: LatencyConfig, cuda_graph: bool) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed + batch)
    x = torch.randn(batch, *spec.input_size, generator=gen)
    start = time.perf_counter()
    if runtime.stream is None:
        step = runtime.prepare(x)
        samples, warm = time_cpu(step, cfg)
        lat = stats_ms(samples)
        return _result(
            spec,
            backend,
            batch,
            cfg,
            warmup_iters=warm,
            warmup_seconds=cfg.warmup_seconds,
            iters=len(samples),
            seconds=round(time.perf_counter() - start, 3),
            latency_ms=lat,
            e2e_ms=lat,
            throughput_items_per_s=batch * len(samples) / (samples.sum() / 1e9),
        )
    step = runtime.prepare(x)
    dev_samples, warm = time_cuda(step, runtime.stream, cfg)
    host = x.pin_memory()
    e2e_samples, _ = time_cpu(lambda: runtime(host), cfg)
    dev = stats_ms(dev_samples)
    return _result(
        spec,
        backend,
        batch,
        cfg,
        warmup_iters=warm,
        warmup_seconds=cfg.warmup_seconds,
        iters=len(dev_samples),
        seconds=round(time.perf_counter() - start, 3),
        latency_ms=dev,
        device_ms=dev,
        e2e_ms=stats_ms(e2e_samples),
        cuda_graph=cuda_graph,
        include_transfers=False,
        throughput_items_per_s=batch * len(dev_samples) / (dev_samples.sum() / 1e9),
    )


def run_benchmark(
    specs: Sequence[ModelSpec],
    backends: Sequence[str],
    cfg: LatencyConfig,
    log: Callable[[str], None] | None = None,
    only_applicable: bool = False,
) -> list[dict[str, Any]]:
    """Time every (model, backend, batch).

    Combinations that cannot run here (no GPU, no TensorRT) become rows with ``status: skipped: <reason>``; with
    ``only_applicable``, backends that cannot take the model's kind at all (torch for an ONNX file, ONNX Runtime for
    an engine) are left out instead.
    """
    log = log or (lambda _m: None)
    unknown = [b for b in backends if b not in LATENCY_BACKENDS]
    if unknown:
        raise EdgekdError(f"unknown backend {unknown[0]!r}; choose from {', '.join(LATENCY_BACKENDS)}")
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    rows: list[dict[str, Any]] = []
    try:
        for spec in specs:
            for backend in backends:
                graphs = (
                    [False, True]
                    if cfg.cuda_graph and cfg.device.startswith("cuda") and backend.startswith("torch")
                    else [False]
                )
                if only_applicable and not _applicable(spec, backend):
                    continue
                for cuda_graph in graphs:
                    rows.extend(_run_backend(spec, backend, cfg, cuda_graph, log))
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def spec_batches(spec: ModelSpec, cfg: LatencyConfig) -> tuple[int, ...]:
    """The batches timed for ``spec``: its fixed batch alone, else the sweep."""
    return (spec.fixed_batch,) if spec.fixed_batch else tuple(cfg.batches)


def _run_backend(spec, backend, cfg, cuda_graph, log) -> list[dict[str, Any]]:
    rows = []
    batches = spec_batches(spec, cfg) if BACKENDS[backend].runs in _FIXED_BATCH_KINDS else tuple(cfg.batches)
    try:
        runtime = _open(spec, backend, cfg, cuda_graph=False)
    except MissingDependency as exc:
        runtime = str(exc)
    if isinstance(runtime, str):
        log(f"{spec.name} / {backend}: skipped ({runtime})")
        return [_result(spec, backend, b, cfg, status=f"skipped: {runtime}") for b in batches]
    for batch in batches:
        label = f"{spec.name} / {backend}{' (CUDA graph)' if cuda_graph else ''} / batch {batch}"
        try:
            if cuda_graph:  # a fresh runtime per captured graph keeps the captured buffers apart
                runtime = _open(spec, backend, cfg, cuda_graph=True)
            row = _measure(runtime, spec, backend, batch, cfg, cuda_graph)
        except (RuntimeError, EdgekdError) as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            log(f"{label}: failed ({reason})")
            rows.append(_result(spec, backend, batch, cfg, status=f"failed: {reason}"))
            continue
        log(f"{label}: median {row['latency_ms']['median']:.3f} ms, {row['throughput_items_per_s']:.1f} items/s")
        rows.append(row)
    return rows


def _ms(value: float | None, width: int = 10) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.3f}"


def format_latency_table(rows: Sequence[dict[str, Any]]) -> str:
    """The on-screen table: one line per (model, backend, batch); latencies in ms per batch, plus ms per image."""
    head = (
        f"{'model':<28} {'backend':<16} {'prec':<5} {'batch':>5} {'runs':>6} {'median ms':>10} {'p90 ms':>10} "
        f"{'p99 ms':>10} {'min ms':>10} {'ms/image':>10} {'images/s':>10}  e2e median ms"
    )
    lines = [head, "-" * len(head)]
    thin = False
    for r in rows:
        backend = r["backend"] + ("+graph" if r.get("cuda_graph") else "")
        if r["status"] != "ok":
            lines.append(f"{r['model'][:28]:<28} {backend:<16} {r['precision'] or '':<5} {r['batch']:>5} {r['status']}")
            continue
        s = r["latency_ms"]
        thin = thin or any(s.get(k) is None for k in PERCENTILE_MIN_RUNS)
        e2e = r["e2e_ms"]["median"] if r.get("e2e_ms") and r.get("device_ms") else None
        lines.append(
            f"{r['model'][:28]:<28} {backend:<16} {r['precision']:<5} {r['batch']:>5} {r['iters']:>6} "
            f"{_ms(s['median'])} {_ms(s['p90'])} {_ms(s['p99'])} {_ms(s['min'])} {_ms(s['median'] / r['batch'])} "
            f"{r['throughput_items_per_s']:>10.1f}  {'' if e2e is None else f'{e2e:.3f}'}"
        )
    lines.append(
        "(median, p90, p99, min: ms per batch of `batch` images; ms/image = median / batch; on CUDA they are device "
        "time by CUDA events, e2e adds copies and sync)"
    )
    if thin:
        need = ", ".join(f"{k} needs {n} runs" for k, n in PERCENTILE_MIN_RUNS.items())
        lines.append(f"(-: too few runs for that percentile: {need}; raise --iters)")
    return "\n".join(lines)


def plot_results(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Median latency per batch (ms, as in the table) and throughput (images/s) against batch size, one line per
    (model, backend); the legend sits below the plots so that it never covers a curve. Saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    keys = sorted({(r["model"], r["backend"], bool(r.get("cuda_graph"))) for r in ok})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    for model, backend, graph in keys:
        pts = sorted(
            (r["batch"], r["latency_ms"]["median"], r["throughput_items_per_s"])
            for r in ok
            if (r["model"], r["backend"], bool(r.get("cuda_graph"))) == (model, backend, graph)
        )
        label = f"{model} / {backend}{' + CUDA graph' if graph else ''}"
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o")
    for ax, ylabel in ((ax1, "median latency per batch (ms)"), (ax2, "throughput (images / s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (images)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    batches = sorted({r["batch"] for r in ok})
    for ax in (ax1, ax2):
        if batches:
            ax.set_xticks(batches, [str(b) for b in batches])
    fig.suptitle(title or "edgekd benchmark-latency")
    if keys:
        fig.legend(loc="lower center", ncol=min(3, len(keys)), fontsize=8, frameon=False)
    rows_of_legend = -(-len(keys) // 3) if keys else 0
    fig.tight_layout(rect=(0, 0.05 + 0.05 * rows_of_legend, 1, 1))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
