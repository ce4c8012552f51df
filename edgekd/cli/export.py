"""``edgekd export``: a checkpoint to a gated ONNX model (FP32 / FP16 / INT8) and optionally a TensorRT engine.

Given an ``.onnx`` file instead of a checkpoint, it only prints the TensorRT-readiness report (exit 2 when the model is
not ready).
"""

from __future__ import annotations

from pathlib import Path

import click


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    from edgekd.errors import EdgekdError

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise EdgekdError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise EdgekdError(f"{what} must be positive integers, got {text!r}")
    return values


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="ONNX path to write (default: <checkpoint stem>.<precision>.onnx beside it)",
)
@click.option("--model", "model_name", default=None, help="architecture of a plain arcface_torch .pt (e.g. mbf)")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8"]),
    default="fp32",
    show_default=True,
    help="fp16: FP16-typed graph with FP32 I/O; int8: explicit Q/DQ graph (needs --calib)",
)
@click.option("--opset", type=int, default=20, show_default=True, help="ONNX opset (TensorRT 10.0 parses 9-20)")
@click.option("--legacy-exporter", is_flag=True, help="use the deprecated TorchScript exporter instead of dynamo")
@click.option(
    "--ort-cpu-rewrites",
    is_flag=True,
    help="bake the ONNX Runtime CPU rewrites (PReLU as Mul/Relu/Add, narrow grouped Conv as depthwise) into the file; "
    "edgekd's own ORT runtime applies them at load anyway, and TensorRT prefers the graph as exported",
)
@click.option(
    "--images", "real_images", default=None, help="real images for the parity gate: an image folder or a data spec"
)
@click.option(
    "--gate-data",
    default="synthetic",
    show_default=True,
    help="generated gate images: a synthetic spec (held-out identities are drawn)",
)
@click.option("--gate-images", type=int, default=64, show_default=True, help="images per gate source")
@click.option("--gate-batches", default="1,8,32", show_default=True, help="batch sizes the gates run at")
@click.option(
    "--min-cosine",
    type=float,
    default=None,
    help="override the per-row cosine threshold (fp32 min 0.99999, fp16 min 0.999, int8 mean 0.995)",
)
@click.option(
    "--pairs",
    default=None,
    help="task-gate pairs: synthetic[:k=v,...] or an insightface .bin (int8 default: synthetic)",
)
@click.option(
    "--max-drop",
    type=float,
    default=0.5,
    show_default=True,
    help="largest allowed drop of accuracy and TAR@FAR, in points",
)
@click.option(
    "--calib",
    default=None,
    help="int8 calibration source: an image folder, a data spec (synthetic:..., rec:...) or builtin",
)
@click.option("--calib-images", type=int, default=128, show_default=True, help="calibration images")
@click.option(
    "--calib-method",
    type=click.Choice(["minmax", "entropy", "percentile"]),
    default="percentile",
    show_default=True,
    help="activation range estimator",
)
@click.option(
    "--calib-cache",
    type=click.Path(file_okay=False),
    default=None,
    help="calibration cache folder (default ~/.cache/edgekd/calib or $EDGEKD_CACHE_DIR/calib)",
)
@click.option(
    "--keep-first", type=int, default=1, show_default=True, help="int8: leading Conv/Gemm layers kept in float"
)
@click.option(
    "--keep-last", type=int, default=1, show_default=True, help="int8: trailing Conv/Gemm layers kept in float"
)
@click.option(
    "--int8-activations",
    type=click.Choice(["int8", "uint8"]),
    default="int8",
    show_default=True,
    help="int8: symmetric (TensorRT) or asymmetric uint8 (ONNX Runtime CPU only)",
)
@click.option("--trt", is_flag=True, help="also build a TensorRT engine (needs the trt extra and an NVIDIA GPU)")
@click.option(
    "--trt-via",
    type=click.Choice(["onnx", "torch-tensorrt"]),
    default="onnx",
    show_default=True,
    help="build through TensorRT's ONNX parser or compile with torch-tensorrt",
)
@click.option("--trt-batch", default="1,8,64", show_default=True, help="optimization profile min,opt,max batch")
@click.option("--workspace-gib", type=float, default=1.0, show_default=True, help="TensorRT builder workspace")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None, help="TensorRT timing cache file")
@click.option(
    "--opt-level",
    "optimization_level",
    type=click.IntRange(0, 5),
    default=3,
    show_default=True,
    help="TensorRT builder optimization level",
)
@click.option("--seed", type=int, default=0, show_default=True, help="picks gate and calibration images")
def command(checkpoint, out, model_name, gate_batches, trt_batch, **kw) -> None:
    """Export CHECKPOINT to ONNX behind parity gates; nothing final is written if a gate fails."""
    from edgekd.errors import EdgekdError
    from edgekd.export.pipeline import ExportOptions, export_checkpoint
    from edgekd.export.tensorrt import EngineProfile

    if Path(checkpoint).suffix == ".onnx":
        from edgekd.export.readiness import check_readiness

        if not Path(checkpoint).is_file():
            raise EdgekdError(f"{checkpoint} does not exist")
        report = check_readiness(checkpoint, name=Path(checkpoint).name)
        click.echo(report.format())
        if not report.ready:
            raise EdgekdError(f"{Path(checkpoint).name} is not TensorRT-ready: {report.errors()[0].message}")
        return
    batches = parse_ints(trt_batch, "--trt-batch")
    if len(batches) != 3:
        raise EdgekdError("--trt-batch takes three values: min,opt,max")
    options = ExportOptions(
        gate_batches=parse_ints(gate_batches, "--gate-batches"), profile=EngineProfile(*batches), **kw
    )
    export_checkpoint(checkpoint, out, options, model_name=model_name, log=click.echo)
