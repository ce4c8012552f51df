"""``edgekd export``: a checkpoint to a gated ONNX model (FP32 / FP16 / INT8) and optionally a TensorRT engine, or
(``--target executorch``) to a gated ExecuTorch program for XNNPACK (FP32 / INT8).

Given an ``.onnx`` file instead of a checkpoint, it only prints the TensorRT-readiness report (exit 2 when the model is
not ready).

This module also holds the option types the deployment commands (export, eval, benchmark-latency) share: every number,
list and path is checked while the command line is parsed, before any model is loaded; a bad one is a single
``edgekd: error:`` line (``edgekd.cli.main`` prints click's usage errors that way too).
"""

from __future__ import annotations

from pathlib import Path

import click

from edgekd.calib import CALIBRATION_METHODS
from edgekd.cli.options import Number, positive
from edgekd.distill.run_report import update_run_report
from edgekd.errors import EdgekdError
from edgekd.export.builders.tensorrt import EngineProfile
from edgekd.export.checks.readiness import check_readiness
from edgekd.export.options import ENGINE_ROUTES, PRECISIONS, TARGETS, ExportOptions
from edgekd.export.passes.int8 import ACTIVATION_TYPES, Int8Options
from edgekd.export.passes.precisions import PRECISION_TABLE
from edgekd.export.pipeline import export_checkpoint
from edgekd.export.runtimes import FILE_KINDS, file_kind
from edgekd.rules import Rule
from edgekd.utils.out_paths import check_output_dir, check_output_file


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> ``(1, 8, 32)``; anything but positive integers is a one-line error naming ``what``."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise EdgekdError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise EdgekdError(f"{what} must be positive integers, got {text!r}")
    return values


def _option_name(param: click.Parameter | None) -> str:
    return param.opts[0] if param is not None and param.opts else "value"


class PositiveInts(click.ParamType):
    """Comma-separated integers >= 1, optionally exactly ``count`` of them (``1,8,32``)."""

    name = "N[,N...]"

    def __init__(self, count: int | None = None) -> None:
        self.count = count

    def convert(self, value, param, ctx) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        values = parse_ints(str(value), _option_name(param))
        if self.count is not None and len(values) != self.count:
            raise EdgekdError(f"{_option_name(param)} takes {self.count} comma-separated integers, got {value!r}")
        return values


class PixelValues(click.ParamType):
    """One value for every channel, or one per channel (``127.5`` or ``123.7,116.3,103.5``), on the 0-255 scale."""

    name = "V[,V,V]"

    def __init__(self, positive: bool = False) -> None:
        self.positive = positive

    def convert(self, value, param, ctx) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        option = _option_name(param)
        try:
            values = tuple(float(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            raise EdgekdError(f"{option} takes one or three numbers on the 0-255 pixel scale, got {value!r}") from None
        if len(values) not in (1, 3):
            raise EdgekdError(f"{option} takes one or three numbers on the 0-255 pixel scale, got {value!r}")
        above_floor = all(v > 0.0 for v in values) if self.positive else all(v >= 0.0 for v in values)
        if not above_floor or max(values) > 255.0:
            bound = "in (0, 255]" if self.positive else "in [0, 255]"
            raise EdgekdError(f"{option} values must lie {bound} (0-255 pixel scale), got {value!r}")
        return values


class OutputFile(click.ParamType):
    """A file the command will write: not a folder, the right suffix, in a writable folder (checked at parse time)."""

    name = "FILE"

    def __init__(self, suffix: str | None = None) -> None:
        self.suffix = suffix

    def convert(self, value, param, ctx) -> str:
        check_output_file(value, self.suffix, _option_name(param))
        return str(value)


class OutputDir(click.ParamType):
    """A folder the command will write into (created when missing): not a file, and writable."""

    name = "DIR"

    def convert(self, value, param, ctx) -> str:
        check_output_dir(value, _option_name(param))
        return str(value)


# What the help says of each precision is read from the table, so a new precision needs no edit here.
_PRECISION_HELP = "; ".join(
    f"{p.name}: {p.summary}" + (" (needs --calib)" if p.needs_calibration else "") for p in PRECISION_TABLE.values()
)
_THRESHOLD_HELP = ", ".join(f"{p.name} {p.statistic} {p.min_cosine}" for p in PRECISION_TABLE.values())
_DEFAULT_PAIRS_HELP = ", ".join(
    f"{p.name} default: {p.default_pairs}" for p in PRECISION_TABLE.values() if p.default_pairs
)
_CALIBRATED = " and ".join(p.name for p in PRECISION_TABLE.values() if p.needs_calibration)

CHECKPOINT_SUFFIXES = FILE_KINDS["checkpoint"]
# what eval and benchmark-latency run
EXPORTED_SUFFIXES = (*FILE_KINDS["onnx"], *FILE_KINDS["engine"], *FILE_KINDS["executorch"])


def existing_file(suffixes: tuple[str, ...] | None = None, what: str = "file"):
    """A click callback: the argument names an existing, non-empty file (with one of ``suffixes``)."""

    def check(ctx, param, value):
        for path in value if isinstance(value, tuple) else (value,):
            if path is None:
                continue
            p = Path(path)
            if not p.exists():
                raise EdgekdError(f"{what} {path} does not exist")
            if not p.is_file():
                raise EdgekdError(f"{what} {path} is not a file")
            if suffixes and p.suffix not in suffixes:
                raise EdgekdError(f"{what} {path} has suffix {p.suffix or '(none)'!r}; expected {', '.join(suffixes)}")
            if p.stat().st_size == 0:
                raise EdgekdError(f"{what} {path} is empty")
        return value

    return check


@click.command("export")
@click.argument(
    "checkpoint",
    type=click.Path(dir_okay=False),
    callback=existing_file((*CHECKPOINT_SUFFIXES, *FILE_KINDS["onnx"]), "checkpoint"),
)
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default="onnx",
    show_default=True,
    help="onnx: a dynamic-batch ONNX file for ONNX Runtime and TensorRT (servers, PCs, NVIDIA); executorch: a "
    "batch-1 .pte program for ExecuTorch's XNNPACK backend (Android, iOS, embedded Linux; fp32, or int8 quantized "
    "by PT2E with the XNNPACK quantizer on --calib; needs the executorch extra)",
)
@click.option(
    "--out",
    type=OutputFile(),
    default=None,
    help="path to write, ending in the target's suffix (.onnx, .pte; default: <checkpoint stem>.<precision>.onnx or "
    ".pte beside it)",
)
@click.option("--model", "model_name", default=None, help="architecture of a plain arcface_torch .pt (e.g. mbf)")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="fp32",
    show_default=True,
    help=_PRECISION_HELP,
)
@click.option(
    "--static-batch",
    type=click.IntRange(min=1),
    default=None,
    help="fix the batch axis at N instead of a dynamic one (NNAPI, CoreML and other fixed-shape runtimes); "
    "gated at batch N, written as <stem>.<precision>.bN.onnx by default",
)
@click.option(
    "--opset", type=click.IntRange(min=9), default=20, show_default=True, help="ONNX opset (TensorRT 10.0 parses 9-20)"
)
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
@click.option("--gate-images", type=click.IntRange(min=1), default=64, show_default=True, help="images per gate source")
@click.option(
    "--gate-batches", type=PositiveInts(), default="1,8,32", show_default=True, help="batch sizes the gates run at"
)
@click.option(
    "--min-cosine",
    type=Number(Rule(float, low=-1.0, high=1.0)),
    default=None,
    help=f"override the per-row cosine threshold ({_THRESHOLD_HELP})",
)
@click.option(
    "--pairs",
    default=None,
    help=f"task-gate pairs: synthetic[:k=v,...] or an insightface .bin ({_DEFAULT_PAIRS_HELP})",
)
@click.option(
    "--max-drop",
    type=Number(Rule(float, low=0.0, high=100.0)),
    default=0.5,
    show_default=True,
    help="largest allowed drop of accuracy and TAR@FAR, in points (percent)",
)
@click.option(
    "--calib",
    default=None,
    help=f"{_CALIBRATED} calibration source: anything --data takes (an image folder, a RecordIO folder or .rec, "
    "synthetic:..., fmnist), a flat folder of images, or builtin",
)
@click.option("--calib-images", type=click.IntRange(min=1), default=128, show_default=True, help="calibration images")
@click.option(
    "--skip-bad",
    is_flag=True,
    help="leave out calibration (and --images) images that cannot be read, and say how many, instead of stopping",
)
@click.option(
    "--calib-method",
    type=click.Choice(CALIBRATION_METHODS),
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
    "--keep-first",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="int8: leading Conv/Gemm layers kept in float",
)
@click.option(
    "--keep-last",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="int8: trailing Conv/Gemm layers kept in float",
)
@click.option(
    "--int8-activations",
    type=click.Choice(ACTIVATION_TYPES),
    default="int8",
    show_default=True,
    help="int8: symmetric (TensorRT) or asymmetric uint8 (ONNX Runtime CPU only)",
)
@click.option("--trt", is_flag=True, help="also build a TensorRT engine (needs the trt extra and an NVIDIA GPU)")
@click.option(
    "--trt-via",
    type=click.Choice(ENGINE_ROUTES),
    default="onnx",
    show_default=True,
    help="build through TensorRT's ONNX parser or compile with torch-tensorrt",
)
@click.option(
    "--trt-batch",
    type=PositiveInts(count=3),
    default="1,8,64",
    show_default=True,
    help="optimization profile min,opt,max batch (with --static-batch N: N,N,N)",
)
@click.option(
    "--workspace-gib",
    type=positive(float),
    default=1.0,
    show_default=True,
    help="TensorRT builder workspace",
)
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
@click.pass_context
def command(
    ctx, checkpoint, out, model_name, gate_batches, trt_batch, keep_first, keep_last, int8_activations, **kw
) -> None:
    """Export CHECKPOINT to ONNX (or an ExecuTorch .pte) behind parity gates; nothing final is written if a gate
    fails."""
    if file_kind(checkpoint) == "onnx":
        if kw["target"] != "onnx":
            raise EdgekdError(f"--target {kw['target']} exports a checkpoint; {Path(checkpoint).name} is an ONNX file")
        _readiness_only(checkpoint)
        return
    static = kw["static_batch"]
    explicit_profile = ctx.get_parameter_source("trt_batch") == click.core.ParameterSource.COMMANDLINE
    if static and explicit_profile and trt_batch != (static, static, static):
        raise EdgekdError(
            f"--static-batch {static} fixes the engine's batch; drop --trt-batch or pass {static},{static},{static}"
        )
    if not trt_batch[0] <= trt_batch[1] <= trt_batch[2]:
        raise EdgekdError(f"--trt-batch needs min <= opt <= max, got {','.join(map(str, trt_batch))}")
    int8 = Int8Options(keep_first=keep_first, keep_last=keep_last, activations=int8_activations)
    options = ExportOptions(gate_batches=gate_batches, int8=int8, profile=EngineProfile(*trt_batch), **kw)
    result = export_checkpoint(checkpoint, out, options, model_name=model_name, log=click.echo)
    update_run_report(result.program or result.onnx, click.echo)


def _readiness_only(path: str) -> None:
    """``edgekd export MODEL.onnx``: the TensorRT-readiness report; exit 2 when the model is not ready."""
    report = check_readiness(path, name=Path(path).name)
    click.echo(report.format())
    if not report.ready:
        raise EdgekdError(f"{Path(path).name} is not TensorRT-ready: {report.errors()[0].message}")
