"""``edgekd export`` as a function: checkpoint -> gated ONNX (FP32 / FP16 / INT8) -> optional gated TensorRT engine.

Every artifact is written under a temporary name in its target folder, run through its gates from there, and renamed
into place only when they pass; a failure leaves nothing final behind and raises ``GateFailed`` after the report has
been logged. Each final artifact gets a sidecar ``<artifact>.json``: metadata, gate results, readiness findings,
calibration details and the environment. The engine half (``--trt``) lives in ``trt_export``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from edgekd.errors import EdgekdError
from edgekd.export.gates import DEFAULT_GATE_BATCHES, DEFAULT_MAX_DROP, GateReport, parity_gate, task_gate
from edgekd.export.tensorrt import EngineProfile

__all__ = ["PRECISIONS", "ExportOptions", "ExportResult", "export_checkpoint", "gate_inputs", "default_output"]

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_GATE_PAIRS = 3000
# BENCHMARKS.md "Export and latency" (mbf, 1 thread, batch 1): ORT CPU FP32 9.62 ms, INT8 S8S8 14.99 ms, U8S8 13.14 ms.
INT8_CPU_NOTE = (
    "INT8 Q/DQ on ONNX Runtime's CPU provider is usually slower than FP32 (BENCHMARKS.md: mbf 1 thread batch 1, "
    "14.99 ms INT8 vs 9.62 ms FP32); it is meant for TensorRT and other INT8 accelerators"
)
MIN_IMPOSTORS_AT_FAR = 20
Log = Callable[[str], None]


@dataclass
class ExportOptions:
    """Everything ``edgekd export`` can be told; the CLI maps its options one to one onto these fields."""

    precision: str = "fp32"
    opset: int = 20
    legacy_exporter: bool = False
    static_batch: int | None = None  # fix the batch axis (NNAPI/CoreML/other fixed-shape runtimes); None: dynamic
    ort_cpu_rewrites: bool = False  # bake edgekd.export.ort_cpu's rewrites into the artifact
    # gates
    gate_batches: tuple[int, ...] = DEFAULT_GATE_BATCHES
    gate_images: int = 64
    real_images: str | None = None
    gate_data: str = "synthetic"  # generated gate images: a synthetic spec (held-out identities are drawn)
    min_cosine: float | None = None
    pairs: str | None = None  # task-gate pairs; INT8 defaults to the built-in held-out synthetic pairs
    max_drop: float = DEFAULT_MAX_DROP
    seed: int = 0
    # int8
    calib: str | None = None
    calib_images: int = 128
    calib_method: str = "percentile"
    calib_cache: str | None = None
    keep_first: int = 1
    keep_last: int = 1
    int8_activations: str = "int8"
    # tensorrt
    trt: bool = False
    trt_via: str = "onnx"
    profile: EngineProfile = field(default_factory=EngineProfile)
    workspace_gib: float = 1.0
    timing_cache: str | None = None
    optimization_level: int = 3


@dataclass
class ExportResult:
    """Paths written and the reports behind them."""

    onnx: Path
    gate: GateReport
    readiness: Any
    engine: Path | None = None
    engine_gate: GateReport | None = None
    sidecars: list[Path] = field(default_factory=list)


def default_output(checkpoint: str | os.PathLike, precision: str, static_batch: int | None = None) -> Path:
    """``<checkpoint stem>.<precision>.onnx`` next to the checkpoint (``.b<N>`` before ``.onnx`` for a static batch,
    so it does not replace the dynamic-batch file)."""
    ckpt = Path(checkpoint)
    batch = f".b{static_batch}" if static_batch else ""
    return ckpt.with_name(f"{ckpt.stem}.{precision}{batch}.onnx")


def gate_inputs(
    cfg, count: int, seed: int, real: str | None, with_noise: bool, generated: str = "synthetic"
) -> dict[str, torch.Tensor]:
    """Normalized gate images: ``count`` generated faces (held-out identities of the ``generated`` synthetic spec),
    uniform noise (FP32/FP16 only: parity must hold for any input), and ``real`` images (a folder or data spec)."""
    from edgekd.calib.dataset import build_calibration_set
    from edgekd.data import create_dataset
    from edgekd.data.transforms import normalize

    c, h, w = cfg.input_size
    if h != w:
        raise EdgekdError(f"gates need a square input size, the model takes {h}x{w}")
    faces = create_dataset(
        "synthetic", split="heldout", identities=count, images_per_identity=1, image_size=h, channels=c, seed=seed
    )
    batch = torch.stack([faces[i][0] for i in range(len(faces))])
    inputs = {"synthetic": normalize(batch, cfg.mean, cfg.std)}
    if with_noise:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randint(0, 256, (max(8, count // 2), c, h, w), generator=gen, dtype=torch.uint8)
        inputs["noise"] = normalize(noise, cfg.mean, cfg.std)
    if real:
        real_set = build_calibration_set(real, cfg, num_images=count, seed=seed + 1)
        inputs["real"] = torch.from_numpy(real_set.images)
    return inputs


def _resolve_fars(pairs) -> tuple[float, ...]:
    """FARs the pair set resolves: at least ``MIN_IMPOSTORS_AT_FAR`` impostor pairs above the threshold (fewer make
    TAR an order statistic of a handful of pairs, which moves by points under harmless perturbations)."""
    impostors = len(pairs) - pairs.num_genuine
    fars = tuple(f for f in (1e-4, 1e-3, 1e-2, 1e-1) if f * impostors >= MIN_IMPOSTORS_AT_FAR)
    return fars or (1e-1,)


def _load_pairs(spec: str | None, cfg, seed: int):
    """The task-gate pairs: ``synthetic[:k=v,...]`` (held-out identities at the model's input size,
    ``DEFAULT_GATE_PAIRS`` pairs unless the spec says otherwise) or an insightface ``.bin`` file."""
    from edgekd.data import create_pairs

    if spec is None:
        return None
    c, h, _ = cfg.input_size
    if spec == "builtin":
        spec = "synthetic"
    if spec.startswith("synthetic"):
        return create_pairs(spec, pairs=DEFAULT_GATE_PAIRS, image_size=h, channels=c, seed=seed)
    return create_pairs(spec)


def check_options(options: ExportOptions) -> None:
    """One-line errors for option values no export can use (the CLI's click types catch most of them earlier)."""
    if options.precision not in PRECISIONS:
        raise EdgekdError(f"unknown precision {options.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if options.precision == "int8" and not options.calib:
        raise EdgekdError("--precision int8 needs --calib SOURCE (an image folder, a dataset spec, or builtin)")
    for option, value in (("--gate-images", options.gate_images), ("--calib-images", options.calib_images)):
        if value < 1:
            raise EdgekdError(f"{option} must be at least 1, got {value}")
    if options.static_batch is not None and options.static_batch < 1:
        raise EdgekdError(f"--static-batch must be at least 1, got {options.static_batch}")
    if not options.gate_batches or min(options.gate_batches) < 1:
        raise EdgekdError(f"--gate-batches must be positive integers, got {options.gate_batches}")
    if options.min_cosine is not None and not -1.0 <= options.min_cosine <= 1.0:
        raise EdgekdError(f"--min-cosine must lie in [-1, 1], got {options.min_cosine}")
    if not 0.0 <= options.max_drop <= 100.0:
        raise EdgekdError(f"--max-drop must lie in [0, 100] points, got {options.max_drop}")


def _log_deployment_notes(cfg, options: ExportOptions, out: Path, log: Log) -> None:
    """One-line notes on where the artifact will not do what a user may expect: insightface loading, INT8 on CPU."""
    from edgekd.export.insightface import insightface_problems

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


def run_gates(reference, candidate, inputs, precision, artifact, options, cfg, pairs, log) -> GateReport:
    """The parity gate of ``candidate`` against ``reference`` on ``inputs``, plus the task gate on ``pairs`` when given;
    logs the report and returns it (the caller raises on failure, after or before writing, as its artifact needs)."""
    report = parity_gate(
        reference,
        candidate,
        inputs,
        precision=precision,
        artifact=artifact,
        batch_sizes=options.gate_batches,
        threshold=options.min_cosine,
    )
    if pairs is not None:
        task_gate(
            report, reference, candidate, pairs, cfg.mean, cfg.std, max_drop=options.max_drop, fars=_resolve_fars(pairs)
        )
    log(report.format())
    return report


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
    from edgekd.atomic import atomic_path, file_sha256, write_json
    from edgekd.bundle import load_bundle
    from edgekd.export.onnx import export_onnx, model_metadata, save_onnx
    from edgekd.export.outputs import check_output_file
    from edgekd.export.readiness import check_readiness
    from edgekd.export.runtime import OrtRuntime, TorchRuntime

    options = options or ExportOptions()
    log = log or (lambda _msg: None)
    precision = options.precision
    check_options(options)
    if options.static_batch:  # a fixed-shape graph runs only its own batch (and, padded, smaller ones)
        n = options.static_batch
        options = replace(options, gate_batches=(n,), profile=EngineProfile(n, n, n))
    if options.trt:
        from edgekd.export.trt_export import check_trt_available

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
    )
    pairs = _load_pairs(options.pairs or ("synthetic" if precision == "int8" else None), cfg, options.seed)
    calib_set = _calibration_set(cfg, options) if precision == "int8" else None
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
    reference = TorchRuntime(backbone)

    calib_info: dict[str, Any] | None = None
    if precision == "fp32":
        candidate = fp32
    elif precision == "fp16":
        from edgekd.export.fp16 import convert_fp16
        from edgekd.export.onnx import set_metadata

        candidate = convert_fp16(fp32)
        set_metadata(candidate, {"precision": "fp16"})
    else:
        candidate, calib_info = _int8(fp32, calib_set, options, log)

    if options.ort_cpu_rewrites:
        from edgekd.export.ort_cpu import rewrite_for_ort_cpu

        candidate, rewritten = rewrite_for_ort_cpu(candidate)
        log(f"rewrote for ONNX Runtime CPU: {rewritten['prelu']} PReLU, {rewritten['grouped_conv']} grouped Conv")
    readiness = check_readiness(candidate, name=out.name)
    log(readiness.format())
    with atomic_path(out) as tmp:
        save_onnx(candidate, tmp)
        runtime = OrtRuntime(tmp, device="cpu", cpu_rewrites=False)  # gate the artifact exactly as written
        report = run_gates(reference, runtime, inputs, precision, out.name, options, cfg, pairs, log)
        report.raise_if_failed()
    sidecar = out.with_name(out.name + ".json")
    from edgekd.utils.env import environment

    write_json(
        sidecar,
        {
            "artifact": out.name,
            "kind": "onnx",
            "precision": precision,
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": source_hash,
            "model": cfg.to_dict(),
            "opset": options.opset,
            "static_batch": options.static_batch,
            "gate": report.to_dict(),
            "readiness": readiness.to_dict(),
            "calibration": calib_info,
            "environment": environment(),
        },
    )
    log(f"wrote {out} and {sidecar.name}")
    result = ExportResult(onnx=out, gate=report, readiness=readiness, sidecars=[sidecar])
    if options.trt:
        from edgekd.export.trt_export import export_engine

        export_engine(result, fp32, candidate, backbone, cfg, reference, inputs, pairs, options, log)
    return result


def _calibration_set(cfg, options: ExportOptions):
    from edgekd.calib import build_calibration_set

    return build_calibration_set(options.calib, cfg, num_images=options.calib_images, seed=options.seed)


def _int8(fp32, calib_set, options: ExportOptions, log: Log):
    from edgekd.calib import calibrate
    from edgekd.export.int8 import QUANT_OP_TYPES, Int8Options, quantize_qdq

    result = calibrate(
        fp32, calib_set, options.calib_method, op_types=list(QUANT_OP_TYPES), cache_dir=options.calib_cache
    )
    how = "reused cached ranges" if result.hit else f"calibrated in {result.seconds:.1f} s"
    log(
        f"calibration: {options.calib_method} on {len(calib_set)} images from {options.calib} ({how}, key {result.key})"
    )
    qopts = Int8Options(
        keep_first=options.keep_first, keep_last=options.keep_last, activations=options.int8_activations
    )
    quantized = quantize_qdq(fp32, result, qopts)
    info = {
        "source": options.calib,
        "images": len(calib_set),
        "data_fingerprint": calib_set.fingerprint,
        "method": result.method,
        "settings": result.settings,
        "cache_key": result.key,
        "cache_hit": result.hit,
        "cache_path": str(result.path),
        "keep_first": options.keep_first,
        "keep_last": options.keep_last,
        "activations": options.int8_activations,
    }
    return quantized, info
