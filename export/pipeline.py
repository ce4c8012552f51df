"""``edgekd export`` as a function: checkpoint -> gated ONNX (FP32 / FP16 / INT8) -> optional gated TensorRT engine,
or (``--target executorch``) checkpoint -> gated ExecuTorch program (FP32 / INT8, XNNPACK).

The ONNX graph comes out of the passes (``edgekd.export.passes``: export, then the precision's pass from
``PRECISION_TABLE``, then optionally the ONNX Runtime CPU rewrites), is checked for TensorRT readiness, and is written
through ``edgekd.export.artifact.write_gated``: under a temporary name, gated from there, renamed into place only when
the gates pass, then the sidecar ``<artifact>.json`` (metadata, gate results, readiness findings, calibration details
and the environment). With ``--trt`` the engine route (``edgekd.export.engine``) then writes the engine the same way.
The ExecuTorch program is lowered from the PyTorch model (``edgekd.export.builders.executorch``; INT8 calibrated on the
same calibration set) and written the same way, gated as ExecuTorch's runtime runs it under the precision's thresholds.
A failure leaves nothing final behind and raises ``GateFailed`` after the report has been logged.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import onnx
import torch

from edgekd.bundle import load_bundle
from edgekd.calib import CalibrationResult, CalibrationSet, build_calibration_set, calibrate
from edgekd.export.artifact import Artifact, Gates, gate_inputs, load_gate_pairs, log_skipped, write_gated
from edgekd.export.builders.executorch import (
    QUANTIZER,
    XNNPACK_BACKEND,
    build_executorch_program,
    check_executorch_available,
    executorch_versions,
)
from edgekd.export.builders.tensorrt import EngineProfile
from edgekd.export.checks.gates import GateReport
from edgekd.export.checks.insightface import insightface_problems
from edgekd.export.checks.readiness import ReadinessReport, check_readiness
from edgekd.export.engine import check_trt_available, export_engine
from edgekd.export.options import TARGET_SUFFIXES, ExportOptions, check_options
from edgekd.export.passes.int8 import QUANT_OP_TYPES
from edgekd.export.passes.onnx import default_opset, export_onnx, model_metadata, save_onnx
from edgekd.export.passes.ort_cpu import rewrite_for_ort_cpu
from edgekd.export.passes.precisions import PRECISION_TABLE, Precision
from edgekd.export.runtimes import TorchRuntime, open_runtime
from edgekd.models import ModelCfg
from edgekd.utils.hashing import file_sha256
from edgekd.utils.out_paths import check_output_file

__all__ = ["ExportResult", "export_checkpoint", "default_output", "gate_reference"]

Log = Callable[[str], None]


@dataclass
class ExportResult:
    """Paths written and the reports behind them: the ONNX file (with its readiness report, and the engine with
    ``--trt``), or the ExecuTorch program (``--target executorch``; then ``onnx`` and ``readiness`` are None)."""

    onnx: Path | None
    gate: GateReport
    readiness: ReadinessReport | None
    engine: Path | None = None
    engine_gate: GateReport | None = None
    sidecars: list[Path] = field(default_factory=list)
    program: Path | None = None


class _Source(NamedTuple):
    """The checkpoint as given, its model ready to export (FP32, eval, CPU) with its config, and the file's hash."""

    checkpoint: str
    backbone: torch.nn.Module
    cfg: ModelCfg
    sha256: str

    def sidecar(self) -> dict:
        """What every artifact's sidecar says of its source: the checkpoint, its hash and the model's config."""
        return {"checkpoint": self.checkpoint, "checkpoint_sha256": self.sha256, "model": self.cfg.to_dict()}


def default_output(
    checkpoint: str | os.PathLike, precision: str, static_batch: int | None = None, target: str = "onnx"
) -> Path:
    """``<checkpoint stem>.<precision>.onnx`` next to the checkpoint (``.b<N>`` before ``.onnx`` for a static batch,
    so it does not replace the dynamic-batch file); ``<stem>.<precision>.pte`` for ``--target executorch`` (every
    program is batch 1)."""
    ckpt = Path(checkpoint)
    if target == "executorch":
        return ckpt.with_name(f"{ckpt.stem}.{precision}{TARGET_SUFFIXES[target]}")
    batch = f".b{static_batch}" if static_batch else ""
    return ckpt.with_name(f"{ckpt.stem}.{precision}{batch}.onnx")


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    options: ExportOptions | None = None,
    *,
    model_name: str | None = None,
    log: Log | None = None,
) -> ExportResult:
    """Export ``checkpoint`` to a gated ONNX file (and optionally a gated TensorRT engine), or to a gated ExecuTorch
    program (``options.target == "executorch"``).

    Args:
        checkpoint: an edgekd ``.safetensors`` bundle, or an arcface_torch ``.pt`` with ``model_name``.
        out: the ONNX (or ``.pte``) path (default: ``default_output``).
        options: see ``ExportOptions``.
        model_name: architecture of a plain state_dict checkpoint.
        log: receives report lines (the CLI passes ``click.echo``); None is silent.

    Returns:
        The written paths and reports.

    Raises:
        GateFailed: a gate failed; nothing final was written for that artifact.
        MissingDependency: ``--trt`` without TensorRT / torch-tensorrt / a GPU, ``--target executorch`` without the
            ``executorch`` extra (checked before any work).
        EdgekdError: bad options or inputs.
    """
    options = options or ExportOptions()
    check_options(options)
    precision = PRECISION_TABLE[options.precision]
    log = log or (lambda _msg: None)
    torch.manual_seed(options.seed)
    if out is None:
        out = default_output(checkpoint, precision.name, options.static_batch, options.target)
    out = check_output_file(out, TARGET_SUFFIXES[options.target])
    options = _runnable_options(options)

    source = _load_source(checkpoint, model_name)
    # every data source is read before the export, so a bad one fails in seconds, not after the exporter
    gates = _gates(source, precision, options, log)
    calib_set = _calibration_set(source.cfg, options, log) if precision.needs_calibration else None
    if options.target == "executorch":
        written = _export_executorch(out, source, gates, calib_set, options, log)
        return ExportResult(onnx=None, gate=written.gate, readiness=None, program=out, sidecars=[written.sidecar])
    _log_deployment_notes(source.cfg, precision, options, out, log)

    fp32 = _export_fp32(source, options, out, log)
    candidate, calib_info = _make_candidate(fp32, precision, calib_set, options, log)
    readiness = check_readiness(candidate, name=out.name)
    log(readiness.format())
    written = _write_onnx(out, candidate, readiness, gates, source, options, calib_info)
    result = ExportResult(onnx=out, gate=written.gate, readiness=readiness, sidecars=[written.sidecar])
    if options.trt:
        engine = export_engine(
            out, readiness, fp32=fp32, candidate=candidate, backbone=source.backbone, gates=gates, options=options
        )
        result.engine, result.engine_gate = engine.path, engine.gate
        result.sidecars.append(engine.sidecar)
    return result


def _runnable_options(options: ExportOptions) -> ExportOptions:
    """Checked ``options`` with a static batch (an ExecuTorch program's is 1) applied to the gates and the engine
    profile; the TensorRT and ExecuTorch routes are checked to run here, before any work."""
    n = 1 if options.target == "executorch" else options.static_batch
    if n:  # a fixed-shape graph runs only its own batch (and, padded, smaller ones)
        options = replace(options, gate_batches=(n,), profile=EngineProfile(n, n, n))
    if options.trt:
        check_trt_available(options)
    if options.target == "executorch":
        check_executorch_available()
    return options


def _load_source(checkpoint: str | os.PathLike, model_name: str | None) -> _Source:
    bundle = load_bundle(checkpoint, model=model_name)
    backbone = bundle.backbone.eval().float().cpu()
    return _Source(str(checkpoint), backbone, backbone.cfg, file_sha256(checkpoint))


def _gates(source: _Source, precision: Precision, options: ExportOptions, log: Log) -> Gates:
    """What every artifact is gated against: PyTorch FP32 on the gate images (noise too where ``precision`` wants it)
    and on the task-gate pairs (``precision``'s default ones when ``--pairs`` is not given)."""
    cfg = source.cfg
    inputs = gate_inputs(
        cfg,
        options.gate_images,
        options.seed,
        options.real_images,
        with_noise=precision.noise_gate,
        generated=options.gate_data,
        skip_bad=options.skip_bad,
        log=log,
    )
    pairs = load_gate_pairs(options.pairs or precision.default_pairs, cfg, options.seed)
    return Gates(
        reference=gate_reference(source.backbone),
        inputs=inputs,
        pairs=pairs,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        batches=options.gate_batches,
        min_cosine=options.min_cosine,
        max_drop=options.max_drop,
        log=log,
    )


def gate_reference(backbone: torch.nn.Module) -> TorchRuntime:
    """The gates' FP32 PyTorch reference: a copy of ``backbone`` with its weights in channels_last, where oneDNN's CPU
    convolutions run faster than in NCHW for the same outputs up to float rounding (ms an image on 2 cores: mbf
    112x112 11 vs 15-17 at batch 64, r18 25 vs 32 and r50 46 vs 55 at batch 16). A copy, so the graphs are still
    exported from the model as loaded."""
    return TorchRuntime(copy.deepcopy(backbone).to(memory_format=torch.channels_last))


def _calibration_set(cfg: ModelCfg, options: ExportOptions, log: Log) -> CalibrationSet:
    calib_set = build_calibration_set(
        options.calib, cfg, num_images=options.calib_images, seed=options.seed, skip_bad=options.skip_bad
    )
    log_skipped(calib_set.skipped, f"calibration source {options.calib}", log)
    return calib_set


def _log_deployment_notes(cfg: ModelCfg, precision: Precision, options: ExportOptions, out: Path, log: Log) -> None:
    """One-line notes on where the artifact will not do what a user may expect: insightface loading, and the
    precision's own note when it is not headed for TensorRT."""
    problems = insightface_problems(
        cfg.input_size,
        mean=cfg.mean,
        std=cfg.std,
        channel_order=cfg.channel_order,
        batch=options.static_batch,
    )
    if problems:
        log(f"warning: {out.name} will not load through insightface's model_zoo.get_model: {'; '.join(problems)}")
    if precision.ort_cpu_note and not options.trt:
        log(f"note: {precision.ort_cpu_note}")


def _export_fp32(source: _Source, options: ExportOptions, out: Path, log: Log) -> onnx.ModelProto:
    """The FP32 ONNX graph that every precision's pass starts from."""
    cfg = source.cfg
    batch = f", static batch {options.static_batch}" if options.static_batch else ""
    log(f"exporting {cfg.name} {tuple(cfg.input_size)} -> {out} [{options.precision}{batch}]")
    extra = {"static_batch": options.static_batch} if options.static_batch else {}
    return export_onnx(
        source.backbone,
        cfg,
        opset=options.opset,
        legacy_exporter=options.legacy_exporter,
        metadata=model_metadata(cfg, precision="fp32", source_sha256=source.sha256, **extra),
        static_batch=options.static_batch,
    )


def _make_candidate(
    fp32: onnx.ModelProto, precision: Precision, calib_set: CalibrationSet | None, options: ExportOptions, log: Log
) -> tuple[onnx.ModelProto, dict[str, Any] | None]:
    """The artifact's graph: ``precision``'s pass over the FP32 graph (with ranges calibrated on ``calib_set`` when it
    needs them), then the ONNX Runtime CPU rewrites when asked for; and the calibration details for the sidecar."""
    ranges, calib_info = _calibrate(fp32, calib_set, options, log) if calib_set is not None else (None, None)
    candidate = precision.make(fp32, ranges, options.int8)
    if options.ort_cpu_rewrites:
        candidate, rewritten = rewrite_for_ort_cpu(candidate)
        log(f"rewrote for ONNX Runtime CPU: {rewritten['prelu']} PReLU, {rewritten['grouped_conv']} grouped Conv")
    return candidate, calib_info


def _calibrate(
    fp32: onnx.ModelProto, calib_set: CalibrationSet, options: ExportOptions, log: Log
) -> tuple[CalibrationResult, dict[str, Any]]:
    """Activation ranges of ``fp32`` on ``calib_set`` (from the cache when it has them), and the sidecar's account of
    them and of the Q/DQ placement."""
    result = calibrate(
        fp32, calib_set, options.calib_method, op_types=list(QUANT_OP_TYPES), cache_dir=options.calib_cache
    )
    how = "reused cached ranges" if result.hit else f"calibrated in {result.seconds:.1f} s"
    log(
        f"calibration: {options.calib_method} on {len(calib_set)} images from {options.calib} ({how}, key {result.key})"
    )
    info = {
        "source": options.calib,
        "images": len(calib_set),
        "skipped": calib_set.skipped,
        "data_fingerprint": calib_set.fingerprint,
        "method": result.method,
        "settings": result.settings,
        "cache_key": result.key,
        "cache_hit": result.hit,
        "cache_path": str(result.path),
        "keep_first": options.int8.keep_first,
        "keep_last": options.int8.keep_last,
        "activations": options.int8.activations,
    }
    return result, info


def _write_onnx(
    out: Path,
    candidate: onnx.ModelProto,
    readiness: ReadinessReport,
    gates: Gates,
    source: _Source,
    options: ExportOptions,
    calib_info: dict[str, Any] | None,
) -> Artifact:
    """The gated write of the ONNX artifact, gated exactly as written (ONNX Runtime CPU on the file, no rewrites)."""
    return write_gated(
        out,
        lambda tmp: save_onnx(candidate, tmp),
        lambda tmp: open_runtime(tmp, "ort-cpu", cpu_rewrites=False),
        gates,
        kind="onnx",
        precision=options.precision,
        sidecar={
            **source.sidecar(),
            "opset": default_opset(candidate),  # what the file imports, not what was asked for
            "static_batch": options.static_batch,
            "readiness": readiness.to_dict(),
            "calibration": calib_info,
        },
    )


def _export_executorch(
    out: Path, source: _Source, gates: Gates, calib_set: CalibrationSet | None, options: ExportOptions, log: Log
) -> Artifact:
    """The ExecuTorch route: the XNNPACK program lowered from the PyTorch model (INT8 calibrated on ``calib_set``),
    written through the gated write and gated as ExecuTorch's own runtime runs it."""
    cfg = source.cfg
    log(f"exporting {cfg.name} {tuple(cfg.input_size)} -> {out} [executorch {options.precision}, XNNPACK, batch 1]")
    metadata = model_metadata(cfg, precision=options.precision, source_sha256=source.sha256, static_batch=1)
    calibration = None
    if calib_set is not None:
        log(f"calibration: {QUANTIZER}, on {len(calib_set)} images from {options.calib}")
        calibration = {
            "source": options.calib,
            "images": len(calib_set),
            "skipped": calib_set.skipped,
            "data_fingerprint": calib_set.fingerprint,
            "quantizer": QUANTIZER,
        }
    built = build_executorch_program(
        source.backbone,
        tuple(cfg.input_size),
        options.precision,
        metadata,
        calib_images=calib_set.images if calib_set is not None else None,
        artifact=out.name,
        log=log,
    )
    return write_gated(
        out,
        lambda tmp: tmp.write_bytes(built.data),
        lambda tmp: open_runtime(tmp, "executorch", precision=options.precision),
        gates,
        kind="executorch-program",
        precision=options.precision,
        sidecar={
            **source.sidecar(),
            "static_batch": 1,
            "delegate": XNNPACK_BACKEND,
            "delegation": built.census.to_dict(),
            "build_seconds": built.seconds,
            "versions": executorch_versions(),
            "calibration": calibration,
        },
    )
