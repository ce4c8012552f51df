"""``edgekd benchmark-latency``: latency and throughput of torch, ONNX Runtime and TensorRT over a batch sweep.

Each MODEL is a checkpoint (``.safetensors``, or an arcface_torch ``.pt`` with ``--model``), an ``.onnx`` file or a
TensorRT ``.plan``; every requested backend that can run it is timed (a checkpoint is also exported to ONNX on the fly
for the ONNX Runtime backends). Unavailable backends (no GPU, no TensorRT) are listed as skipped with the reason.
"""

from __future__ import annotations

from datetime import UTC
from pathlib import Path

import click


def _specs(models: tuple[str, ...], arch: str | None, backends: tuple[str, ...], tmpdir: str, log):
    from edgekd.atomic import file_sha256
    from edgekd.errors import EdgekdError
    from edgekd.export.latency import ModelSpec
    from edgekd.export.onnx import read_metadata

    specs = []
    for path in models:
        p = Path(path)
        if not p.is_file():
            raise EdgekdError(f"model {path} does not exist")
        sha = file_sha256(p)
        if p.suffix == ".onnx":
            meta = read_metadata(p)
            size = tuple(meta["input_size"]) if "input_size" in meta else None
            if size is None:
                raise EdgekdError(f"{p.name} has no input_size metadata; export it with edgekd export")
            specs.append(
                ModelSpec(
                    path=str(p),
                    name=p.name,
                    onnx=str(p),
                    precision=str(meta.get("precision", "fp32")),
                    sha256=sha,
                    input_size=size,
                )
            )
        elif p.suffix in (".plan", ".engine"):
            import json

            side = p.with_name(p.name + ".json")
            info = json.loads(side.read_text()) if side.is_file() else {}
            if "input_shape" not in info:
                raise EdgekdError(
                    f"{p.name} has no sidecar {side.name} with its input shape; build it with edgekd export"
                )
            specs.append(
                ModelSpec(
                    path=str(p),
                    name=p.name,
                    precision=info.get("precision", "fp32"),
                    sha256=sha,
                    input_size=tuple(info["input_shape"]),
                )
            )
        else:
            from edgekd.bundle import load_bundle

            backbone = load_bundle(p, model=arch).backbone.eval()
            cfg = backbone.cfg
            onnx_path = None
            if any(b.startswith("ort") for b in backends):
                from edgekd.export.onnx import export_onnx, model_metadata, save_onnx

                log(f"exporting {p.name} to ONNX (fp32) for the ONNX Runtime backends")
                onnx_path = str(Path(tmpdir) / f"{p.stem}.onnx")
                save_onnx(export_onnx(backbone, cfg, metadata=model_metadata(cfg)), onnx_path)
            specs.append(
                ModelSpec(
                    path=str(p),
                    name=p.name,
                    module=backbone,
                    onnx=onnx_path,
                    sha256=sha,
                    input_size=tuple(cfg.input_size),
                )
            )
    return specs


@click.command("benchmark-latency")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--model", "arch", default=None, help="architecture of a plain arcface_torch .pt MODEL")
@click.option(
    "--backend",
    "backends",
    multiple=True,
    type=click.Choice(["torch", "torch-compile", "ort-cpu", "ort-cuda", "tensorrt"]),
    help="backends to time (repeatable; default: all that apply)",
)
@click.option("--batch", "batches", default="1,8", show_default=True, help="comma-separated batch sizes")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda for the torch backends")
@click.option("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime (default: torch's)")
@click.option("--warmup", "warmup_iters", type=int, default=10, show_default=True, help="warm-up runs (at least)")
@click.option("--warmup-seconds", type=float, default=0.5, show_default=True, help="warm-up time (at least)")
@click.option("--iters", type=int, default=50, show_default=True, help="timed runs (at least)")
@click.option("--min-seconds", type=float, default=2.0, show_default=True, help="timed duration (at least)")
@click.option("--max-iters", type=int, default=10_000, show_default=True, help="timed runs (at most)")
@click.option(
    "--cuda-graph/--no-cuda-graph",
    default=True,
    show_default=True,
    help="on CUDA, also time torch backends as a captured CUDA graph",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default="runs/latency/latency.json",
    show_default=True,
    help="JSON report (with versions, device and threads)",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
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
def command(models, arch, backends, batches, device, threads, json_path, plot_path, seed, ort_graph, **timing) -> None:
    """Time MODELS on every backend over a batch sweep; print a table, write JSON and a PNG plot."""
    import tempfile
    from dataclasses import asdict
    from datetime import datetime

    import torch

    from edgekd.atomic import write_json
    from edgekd.cli.export import parse_ints
    from edgekd.export.latency import LATENCY_BACKENDS, LatencyConfig, format_table, plot_results, run_benchmark
    from edgekd.utils.env import environment
    from edgekd.version import __version__

    threads = threads or torch.get_num_threads()  # one stated count for torch and ONNX Runtime alike
    cfg = LatencyConfig(
        batches=parse_ints(batches, "--batch"),
        device=device,
        threads=threads,
        seed=seed,
        ort_cpu_rewrites=ort_graph == "rewritten",
        **timing,
    )
    with tempfile.TemporaryDirectory(prefix="edgekd-latency-") as tmpdir:
        specs = _specs(models, arch, backends or LATENCY_BACKENDS, tmpdir, click.echo)
        rows = run_benchmark(specs, backends or LATENCY_BACKENDS, cfg, log=click.echo, only_applicable=not backends)
    click.echo(format_table(rows))
    report = {
        "tool": "edgekd benchmark-latency", "edgekd_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": environment(benchmark_threads=threads),
        "config": {**asdict(cfg), "backends": list(backends or LATENCY_BACKENDS)}, "results": rows,
    }  # fmt: skip
    write_json(json_path, report)
    plot = Path(plot_path) if plot_path else Path(json_path).with_suffix(".png")
    plot_results(rows, plot, title=f"edgekd benchmark-latency ({device}, threads={threads})")
    click.echo(f"wrote {json_path} and {plot}")
