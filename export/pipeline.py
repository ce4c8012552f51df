"""``edgekd export`` as a function: checkpoint -> gated ONNX (FP32 / FP16 / INT8) -> optional gated TensorRT engine.

The ONNX graph comes out of the passes (``edgekd.export.passes``: export, then FP16 or INT8, then optionally the ONNX
Runtime CPU rewrites), is checked for TensorRT readiness, and is written through ``edgekd.export.artifact.write_gated``:
under a temporary name, gated from there, renamed into place only when the gates pass, then the sidecar
``<artifact>.json`` (metadata, gate results, readiness findings, calibration details and the environment). With
``--trt`` the engine route (``edgekd.export.engine``) then writes the engine the same way. A failure leaves nothing
final behind and raises ``GateFailed`` after the report has been logged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx
import torch

from edgekd.bundle import load_bundle
from edgekd.calib import build_calibration_set, calibrate
from edgekd.export.artifact import Gates, gate_inputs, load_gate_pairs, log_skipped, write_gated
from edgekd.export.builders.tensorrt import EngineProfile
from edgekd.export.checks.gates import GateReport
from edgekd.export.checks.insightface import insightface_problems
from edgekd.export.checks.outputs import check_output_file
from edgekd.export.checks.readiness import ReadinessReport, check_readiness
from edgekd.export.engine import check_trt_available, export_engine
from edgekd.export.options import ExportOptions, check_options
from edgekd.export.passes.fp16 import convert_fp16
from edgekd.export.passes.int8 import QUANT_OP_TYPES, quantize_qdq
from edgekd.export.passes.onnx import export_onnx, model_metadata, save_onnx, set_metadata
from edgekd.export.passes.ort_cpu import rewrite_for_ort_cpu
from edgekd.export.runtimes import TorchRuntime, open_runtime
from edgekd.utils.hashing import file_sha256

__all__ = ["ExportResult", "export_checkpoint", "default_output", "INT8_CPU_NOTE"]

# BENCHMARKS.md "Export and latency" (mbf, 1 thread, batch 1): ORT CPU FP32 9.62 ms, INT8 S8S8 14.99 ms, U8S8 13.14 ms.
INT8_CPU_NOTE = (
    "INT8 Q/DQ on ONNX Runtime's CPU provider is usually slower than FP32 (BENCHMARKS.md: mbf 1 thread batch 1, "
    "14.99 ms INT8 vs 9.62 ms FP32); it is meant for TensorRT and other INT8 accelerators"
)
Log = Callable[[str], None]


@dataclass
class ExportResult:
    """Paths written and the reports behind them."""

    onnx: Path
    gate: GateReport
    readiness: ReadinessReport
    engine: Path | None = None
    engine_gate: GateReport | None = None
    sidecars: list[Path] = field(default_factory=list)


def default_output(checkpoint: str | os.PathLike, precision: str, static_batch: int | None = None) -> Path:
    """``<checkpoint stem>.<precision>.onnx`` next to the checkpoint (``.b<N>`` before ``.onnx`` for a static batch,
    so it does not replace the dynamic-batch file)."""
    ckpt = Path(checkpoint)
    batch = f".b{static_batch}" if static_batch else ""
    return ckpt.with_name(f"{ckpt.stem}.{precision}{batch}.onnx")


def _log_deployment_notes(cfg, options: ExportOptions, out: Path, log: Log) -> None:
    """One-line notes on where the artifact will not do what a user may expect: insightface loading, INT8 on CPU."""
    problems = insightface_problems(
        cfg.input_size,
        mean=cfg.mean,
        std=cfg.std,
        channel_order=cfg.channel_order,
        batch=options.static_batch,
    )
    if problems:
        log(f"warning: {out.name} will not load through insightface's model_zoo.get_model: {'; '.join(problems)}")
    if options.precision == "int8" and not options.trt:
        log(f"note: {INT8_CPU_NOTE}")


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    options: ExportOptions | None = None,
    *,
    model_name: str | None = None,
    log: Log | None = None,
) -> ExportResult:
    """Export ``checkpoint`` to a gated ONNX file (and optionally a gated TensorRT engine).

    Args:
        checkpoint: an edgekd ``.safetensors`` bundle, or an arcface_torch ``.pt`` with ``model_name``.
        out: the ONNX path (default: ``default_output``).
        options: see ``ExportOptions``.
        model_name: architecture of a plain state_dict checkpoint.
        log: receives report lines (the CLI passes ``click.echo``); None is silent.

    Returns:
        The written paths and reports.

    Raises:
        GateFailed: a gate failed; nothing final was written for that artifact.
        MissingDependency: ``--trt`` without TensorRT / torch-tensorrt / a GPU (checked before any work).
        EdgekdError: bad options or inputs.
    """
    options = options or ExportOptions()
    log = log or (lambda _msg: None)
    precision = options.precision
    check_options(options)
    if options.static_batch:  # a fixed-shape graph runs only its own batch (and, padded, smaller ones)
        n = options.static_batch
        options = replace(options, gate_batches=(n,), profile=EngineProfile(n, n, n))
    if options.trt:
        check_trt_available(options)
    torch.manual_seed(options.seed)
    out = Path(out) if out is not None else default_output(checkpoint, precision, options.static_batch)
    check_output_file(out, ".onnx")

    bundle = load_bundle(checkpoint, model=model_name)
    backbone = bundle.backbone.eval().float().cpu()
    cfg = backbone.cfg
    source_hash = file_sha256(checkpoint)
    # every data source is read before the export, so a bad one fails in seconds, not after the exporter
    inputs = gate_inputs(
        cfg,
        options.gate_images,
        options.seed,
        options.real_images,
        with_noise=precision != "int8",
        generated=options.gate_data,
        skip_bad=options.skip_bad,
        log=log,
    )
    pairs = load_gate_pairs(options.pairs or ("synthetic" if precision == "int8" else None), cfg, options.seed)
    calib_set = _calibration_set(cfg, options, log) if precision == "int8" else None
    _log_deployment_notes(cfg, options, out, log)

    batch = f", static batch {options.static_batch}" if options.static_batch else ""
    log(f"exporting {cfg.name} {tuple(cfg.input_size)} -> {out} [{precision}{batch}]")
    extra = {"static_batch": options.static_batch} if options.static_batch else {}
    fp32 = export_onnx(
        backbone,
        cfg,
        opset=options.opset,
        legacy_exporter=options.legacy_exporter,
        metadata=model_metadata(cfg, precision="fp32", source_sha256=source_hash, **extra),
        static_batch=options.static_batch,
    )
    gates = Gates(
        reference=TorchRuntime(backbone),
        inputs=inputs,
        pairs=pairs,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        batches=options.gate_batches,
        min_cosine=options.min_cosine,
        max_drop=options.max_drop,
        log=log,
    )

    calib_info: dict[str, Any] | None = None
    if precision == "fp32":
        candidate = fp32
    elif precision == "fp16":
        candidate = convert_fp16(fp32)
        set_metadata(candidate, {"precision": "fp16"})
    else:
        candidate, calib_info = _int8(fp32, calib_set, options, log)

    if options.ort_cpu_rewrites:
        candidate, rewritten = rewrite_for_ort_cpu(candidate)
        log(f"rewrote for ONNX Runtime CPU: {rewritten['prelu']} PReLU, {rewritten['grouped_conv']} grouped Conv")
    readiness = check_readiness(candidate, name=out.name)
    log(readiness.format())
    written = write_gated(
        out,
        lambda tmp: save_onnx(candidate, tmp),
        lambda tmp: open_runtime(tmp, "ort-cpu", cpu_rewrites=False),  # gate the artifact exactly as written
        gates,
        kind="onnx",
        precision=precision,
        sidecar={
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": source_hash,
            "model": cfg.to_dict(),
            "opset": options.opset,
            "static_batch": options.static_batch,
            "readiness": readiness.to_dict(),
            "calibration": calib_info,
        },
    )
    result = ExportResult(onnx=out, gate=written.gate, readiness=readiness, sidecars=[written.sidecar])
    if options.trt:
        engine = export_engine(
            out, readiness, fp32=fp32, candidate=candidate, backbone=backbone, gates=gates, options=options
        )
        result.engine, result.engine_gate = engine.path, engine.gate
        result.sidecars.append(engine.sidecar)
    return result


def _calibration_set(cfg, options: ExportOptions, log: Log):
    calib_set = build_calibration_set(
        options.calib, cfg, num_images=options.calib_images, seed=options.seed, skip_bad=options.skip_bad
    )
    log_skipped(calib_set.skipped, f"calibration source {options.calib}", log)
    return calib_set


def _int8(fp32: onnx.ModelProto, calib_set, options: ExportOptions, log: Log) -> tuple[onnx.ModelProto, dict]:
    result = calibrate(
        fp32, calib_set, options.calib_method, op_types=list(QUANT_OP_TYPES), cache_dir=options.calib_cache
    )
    how = "reused cached ranges" if result.hit else f"calibrated in {result.seconds:.1f} s"
    log(
        f"calibration: {options.calib_method} on {len(calib_set)} images from {options.calib} ({how}, key {result.key})"
    )
    quantized = quantize_qdq(fp32, result, options.int8)
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
    return quantized, info
