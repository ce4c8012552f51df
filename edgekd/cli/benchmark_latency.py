"""``edgekd benchmark-latency``: latency and throughput of torch, ONNX Runtime, TensorRT and ExecuTorch over a batch
sweep, in one table.

Each MODEL is a checkpoint (``.safetensors``, or an arcface_torch ``.pt`` with ``--model``), an ``.onnx`` file, a
TensorRT ``.plan`` or an ExecuTorch ``.pte``; every requested backend that can run it is timed (a checkpoint is also
exported to ONNX on the fly for the ONNX Runtime backends). A graph or program that fixes its batch (every ``.pte``:
batch 1) is timed at that batch only. Unavailable backends (no GPU, no TensorRT, no ExecuTorch) are listed as skipped
with the reason.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

import click
import torch

from edgekd.atomic import write_json
from edgekd.bundle import load_bundle
from edgekd.cli.export import (
    CHECKPOINT_SUFFIXES,
    EXPORTED_SUFFIXES,
    OutputFile,
    PositiveInts,
    existing_file,
)
from edgekd.cli.options import non_negative
from edgekd.distill.run_report import update_run_report
from edgekd.errors import EdgekdError
from edgekd.export.contract import EDGEKD_SOURCE, graph_precision, override_contract, read_contract
from edgekd.export.latency import (
    DEFAULT_ITERS,
    LATENCY_BACKENDS,
    LatencyConfig,
    ModelSpec,
    format_latency_table,
    plot_results,
    run_benchmark,
)
from edgekd.export.passes.onnx import export_onnx, load_onnx, model_metadata, read_metadata, save_onnx
from edgekd.export.passes.precisions import PRECISION_TABLE
from edgekd.export.runtimes import file_kind, open_runtime
from edgekd.formats import read_versioned_json
from edgekd.utils.env import environment
from edgekd.utils.hashing import file_sha256
from edgekd.version import __version__


def _onnx_spec(path: Path, sha: str, image_size: int | None, log) -> ModelSpec:
    """A spec for an ONNX file: its contract from edgekd metadata or, for a foreign file, the graph and insightface's
    conventions; a graph with a fixed batch is timed at that batch only."""
    proto = load_onnx(path)
    contract = override_contract(read_contract(proto, path.name), path.name, image_size=image_size)
    if contract.source != EDGEKD_SOURCE:
        contract = _probed_batch(path, contract, log)
        log(f"note: {path.name} has no edgekd metadata; timing it as {contract.describe()}")
    return ModelSpec(
        path=str(path),
        name=path.name,
        onnx=str(path),
        precision=str(read_metadata(proto).get("precision") or graph_precision(proto)),
        sha256=sha,
        input_size=contract.input_size,
        fixed_batch=contract.batch,
    )


def _probed_batch(path: Path, contract, log):
    """``contract`` with the batch a foreign graph really runs (see ``OrtRuntime._probe_batch``)."""
    if contract.batch is not None or contract.graph_size is None:
        return contract
    runtime = open_runtime(path, "ort-cpu", threads=1, cpu_rewrites=False)
    for note in runtime.notes:
        log(f"note: {note}")
    return replace(contract, batch=runtime.contract.batch)


def _plan_spec(path: Path, sha: str) -> ModelSpec:
    """A spec for a TensorRT engine, whose input shape comes from the sidecar ``edgekd export --trt`` wrote."""
    side = path.with_name(path.name + ".json")
    info = read_versioned_json("export_sidecar", side) if side.is_file() else {}
    if "input_shape" not in info:
        raise EdgekdError(f"{path.name} has no sidecar {side.name} with its input shape; build it with edgekd export")
    return ModelSpec(
        path=str(path),
        name=path.name,
        precision=info.get("precision", "fp32"),
        sha256=sha,
        input_size=tuple(info["input_shape"]),
    )


def _pte_spec(path: Path, sha: str, log) -> ModelSpec:
    """A spec for an ExecuTorch program: its contract from the program (its shapes, and edgekd's metadata or, for a
    foreign one, insightface's conventions); timed at the batch the program fixes."""
    runtime = open_runtime(path, "executorch")
    contract = runtime.contract
    if contract.source != EDGEKD_SOURCE:
        log(f"note: {path.name} has no edgekd metadata; timing it as {contract.describe()}")
    return ModelSpec(
        path=str(path),
        name=path.name,
        precision=runtime.precision,
        sha256=sha,
        input_size=contract.input_size,
        fixed_batch=contract.batch,
    )


def _checkpoint_spec(path: Path, sha: str, arch: str | None) -> ModelSpec:
    backbone = load_bundle(path, model=arch).backbone.eval()
    return ModelSpec(
        path=str(path), name=path.name, module=backbone, sha256=sha, input_size=tuple(backbone.cfg.input_size)
    )


def _export_for_ort(spec: ModelSpec, tmpdir: str, log) -> None:
    """Export a checkpoint's backbone to a temporary FP32 ONNX file for the ONNX Runtime backends."""
    cfg = spec.module.cfg
    log(f"exporting {spec.name} to ONNX (fp32) for the ONNX Runtime backends")
    spec.onnx = str(Path(tmpdir) / f"{Path(spec.name).stem}.onnx")
    save_onnx(export_onnx(spec.module, cfg, metadata=model_metadata(cfg)), spec.onnx)


def _specs(models, arch, image_size, backends, tmpdir: str, log) -> list[ModelSpec]:
    """Every model read and checked first (a bad file fails before any export), then checkpoints exported for ORT."""
    specs = []
    for path in map(Path, models):
        sha, kind = file_sha256(path), file_kind(path)
        if kind == "onnx":
            specs.append(_onnx_spec(path, sha, image_size, log))
        elif kind == "engine":
            specs.append(_plan_spec(path, sha))
        elif kind == "executorch":
            specs.append(_pte_spec(path, sha, log))
        else:
            specs.append(_checkpoint_spec(path, sha, arch))
    if any(b.startswith("ort") for b in backends):
        for spec in specs:
            if spec.module is not None:
                _export_for_ort(spec, tmpdir, log)
    return specs


def _log_batch_limits(specs, batches: tuple[int, ...], log) -> None:
    """One line per fixed-batch graph: the batch that is timed and the requested ones that are skipped."""
    for spec in specs:
        if spec.fixed_batch:
            skipped = [b for b in batches if b != spec.fixed_batch]
            if skipped:
                log(
                    f"note: {spec.name} runs only batch {spec.fixed_batch}: timing batch {spec.fixed_batch} only, "
                    f"skipping batch {', '.join(map(str, skipped))}"
                )


def _log_ort_cpu_notes(specs, backends, log) -> None:
    """What a precision's entry says about ONNX Runtime's CPU provider (INT8: where it disappoints), once each."""
    if "ort-cpu" not in backends:
        return
    precisions = {spec.precision for spec in specs if spec.onnx and spec.precision in PRECISION_TABLE}
    for name in sorted(precisions):
        if PRECISION_TABLE[name].ort_cpu_note:
            log(f"note: {PRECISION_TABLE[name].ort_cpu_note}")


@click.command("benchmark-latency")
@click.argument(
    "models",
    nargs=-1,
    required=True,
    type=click.Path(dir_okay=False),
    callback=existing_file((*CHECKPOINT_SUFFIXES, *EXPORTED_SUFFIXES), "model"),
)
@click.option("--model", "arch", default=None, help="architecture of a plain arcface_torch .pt MODEL")
@click.option(
    "--backend",
    "backends",
    multiple=True,
    type=click.Choice(LATENCY_BACKENDS),
    help="backends to time (repeatable; default: all that apply)",
)
@click.option("--batch", "batches", type=PositiveInts(), default="1,8", show_default=True, help="batch sizes")
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    default=None,
    help="input height = width for an ONNX file whose graph leaves them open and that has no edgekd metadata",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="torch backends")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for torch, ONNX Runtime and ExecuTorch (default: torch's)",
)
@click.option(
    "--warmup",
    "warmup_iters",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="warm-up runs (at least)",
)
@click.option(
    "--warmup-seconds", type=non_negative(float), default=0.5, show_default=True, help="warm-up time (at least)"
)
@click.option(
    "--iters",
    type=click.IntRange(min=1),
    default=DEFAULT_ITERS,
    show_default=True,
    help="timed runs (at least); p90/p95/p99 are reported from 10/20/100 runs on",
)
@click.option(
    "--min-seconds", type=non_negative(float), default=2.0, show_default=True, help="timed duration (at least)"
)
@click.option("--max-iters", type=click.IntRange(min=1), default=10_000, show_default=True, help="timed runs (at most)")
@click.option(
    "--cuda-graph/--no-cuda-graph",
    default=True,
    show_default=True,
    help="on CUDA, also time torch backends as a captured CUDA graph",
)
@click.option(
    "--json",
    "json_path",
    type=OutputFile(".json"),
    default="runs/latency/latency.json",
    show_default=True,
    help="JSON report (with versions, device and threads)",
)
@click.option(
    "--plot",
    "plot_path",
    type=OutputFile(".png"),
    default=None,
    help="PNG plot (default: the JSON path with .png)",
)
@click.option(
    "--ort-graph",
    type=click.Choice(["rewritten", "as-written"]),
    default="rewritten",
    show_default=True,
    help="ONNX Runtime CPU: apply edgekd's exact load-time rewrites (PReLU, narrow grouped Conv; about 2x faster) "
    "or run the graph as written",
)
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the random inputs")
def command(
    models, arch, backends, batches, image_size, device, threads, json_path, plot_path, seed, ort_graph, **timing
) -> None:
    """Time MODELS on every backend over a batch sweep; print a table, write JSON and a PNG plot."""
    if timing["max_iters"] < timing["iters"]:
        raise EdgekdError(f"--max-iters {timing['max_iters']} is below --iters {timing['iters']}")
    threads = threads or torch.get_num_threads()  # one stated count for torch and ONNX Runtime alike
    cfg = LatencyConfig(
        batches=batches,
        device=device,
        threads=threads,
        seed=seed,
        ort_cpu_rewrites=ort_graph == "rewritten",
        **timing,
    )
    chosen = backends or LATENCY_BACKENDS
    with tempfile.TemporaryDirectory(prefix="edgekd-latency-") as tmpdir:
        specs = _specs(models, arch, image_size, chosen, tmpdir, click.echo)
        _log_batch_limits(specs, batches, click.echo)
        _log_ort_cpu_notes(specs, chosen, click.echo)
        rows = run_benchmark(specs, chosen, cfg, log=click.echo, only_applicable=not backends)
    if not any(row["status"] == "ok" for row in rows):
        # Every asked-for combination was skipped: an empty report would read as a benchmark that ran.
        reasons = sorted({f"{row['backend']}: {row['status'].removeprefix('skipped: ')}" for row in rows})
        raise EdgekdError(f"nothing could be timed here ({'; '.join(reasons) or 'no model and backend apply'})")
    click.echo(format_latency_table(rows))
    report = {
        "tool": "edgekd benchmark-latency", "edgekd_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": environment(benchmark_threads=threads),
        "config": {**asdict(cfg), "backends": list(chosen)}, "results": rows,
    }  # fmt: skip
    write_json(json_path, report)
    plot = Path(plot_path) if plot_path else Path(json_path).with_suffix(".png")
    plot_results(rows, plot, title=f"edgekd benchmark-latency ({device}, threads={threads})")
    click.echo(f"wrote {json_path} and {plot}")
    update_run_report(json_path, click.echo)
