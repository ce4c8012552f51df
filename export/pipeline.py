"""``edgekd export`` as a function: checkpoint -> gated ONNX (FP32 / FP16 / INT8) -> optional gated TensorRT engine.

Every artifact is written under a temporary name in its target folder, run through its gates from there, and renamed
into place only when they pass; a failure leaves nothing final behind and raises ``GateFailed`` after the report has
been logged. Each final artifact gets a sidecar ``<artifact>.json``: metadata, gate results, readiness findings,
calibration details and the environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgekd.errors import EdgekdError
from edgekd.export.gates import DEFAULT_GATE_BATCHES, DEFAULT_MAX_DROP, GateReport, parity_gate, task_gate
from edgekd.export.tensorrt import EngineProfile

__all__ = ["PRECISIONS", "ExportOptions", "ExportResult", "export_checkpoint", "gate_inputs", "default_output"]

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_GATE_PAIRS = 3000
MIN_IMPOSTORS_AT_FAR = 20
Log = Callable[[str], None]


@dataclass
class ExportOptions:
    """Everything ``edgekd export`` can be told; the CLI maps its options one to one onto these fields."""

    precision: str = "fp32"
    opset: int = 20
    legacy_exporter: bool = False
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


def default_output(checkpoint: str | os.PathLike, precision: str) -> Path:
    """``<checkpoint stem>.<precision>.onnx`` next to the checkpoint."""
    ckpt = Path(checkpoint)
    return ckpt.with_name(f"{ckpt.stem}.{precision}.onnx")


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


def _run_gates(reference, candidate, inputs, precision, artifact, options, cfg, pairs, log) -> GateReport:
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
    from edgekd.export.readiness import check_readiness
    from edgekd.export.runtime import OrtRuntime, TorchRuntime

    options = options or ExportOptions()
    log = log or (lambda _msg: None)
    precision = options.precision
    if precision not in PRECISIONS:
        raise EdgekdError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and not options.calib:
        raise EdgekdError("--precision int8 needs --calib SOURCE (an image folder, a dataset spec, or builtin)")
    if options.trt:
        _check_trt_available(options)
    torch.manual_seed(options.seed)
    out = Path(out) if out is not None else default_output(checkpoint, precision)
    if out.suffix != ".onnx":
        raise EdgekdError(f"the output {out} must end in .onnx")

    bundle = load_bundle(checkpoint, model=model_name)
    backbone = bundle.backbone.eval().float().cpu()
    cfg = backbone.cfg
    source_hash = file_sha256(checkpoint)
    log(f"exporting {cfg.name} {tuple(cfg.input_size)} -> {out} [{precision}]")
    fp32 = export_onnx(
        backbone,
        cfg,
        opset=options.opset,
        legacy_exporter=options.legacy_exporter,
        metadata=model_metadata(cfg, precision="fp32", source_sha256=source_hash),
    )
    reference = TorchRuntime(backbone)
    inputs = gate_inputs(
        cfg,
        options.gate_images,
        options.seed,
        options.real_images,
        with_noise=precision != "int8",
        generated=options.gate_data,
    )
    pairs = _load_pairs(options.pairs or ("synthetic" if precision == "int8" else None), cfg, options.seed)

    calib_info: dict[str, Any] | None = None
    if precision == "fp32":
        candidate = fp32
    elif precision == "fp16":
        from edgekd.export.fp16 import convert_fp16
        from edgekd.export.onnx import set_metadata

        candidate = convert_fp16(fp32)
        set_metadata(candidate, {"precision": "fp16"})
    else:
        candidate, calib_info = _int8(fp32, cfg, options, log)

    if options.ort_cpu_rewrites:
        from edgekd.export.ort_cpu import rewrite_for_ort_cpu

        candidate, rewritten = rewrite_for_ort_cpu(candidate)
        log(f"rewrote for ONNX Runtime CPU: {rewritten['prelu']} PReLU, {rewritten['grouped_conv']} grouped Conv")
    readiness = check_readiness(candidate, name=out.name)
    log(readiness.format())
    with atomic_path(out) as tmp:
        save_onnx(candidate, tmp)
        runtime = OrtRuntime(tmp, device="cpu", cpu_rewrites=False)  # gate the artifact exactly as written
        report = _run_gates(reference, runtime, inputs, precision, out.name, options, cfg, pairs, log)
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
            "gate": report.to_dict(),
            "readiness": readiness.to_dict(),
            "calibration": calib_info,
            "environment": environment(),
        },
    )
    log(f"wrote {out} and {sidecar.name}")
    result = ExportResult(onnx=out, gate=report, readiness=readiness, sidecars=[sidecar])
    if options.trt:
        _export_engine(result, fp32, candidate, backbone, cfg, reference, inputs, pairs, options, log)
    return result


def _check_trt_available(options: ExportOptions) -> None:
    """Fail in one line before any work when the TensorRT route cannot run here."""
    from edgekd.export.runtime import TRT_INSTALL_HINT
    from edgekd.export.tensorrt import import_tensorrt

    if options.trt_via not in ("onnx", "torch-tensorrt"):
        raise EdgekdError("--trt-via must be onnx or torch-tensorrt")
    if options.trt_via == "torch-tensorrt":
        from edgekd.export.torch_tensorrt import import_torch_tensorrt

        import_torch_tensorrt()
    else:
        import_tensorrt()
    if not torch.cuda.is_available():
        from edgekd.errors import MissingDependency

        raise MissingDependency(f"--trt needs an NVIDIA GPU and none is visible; {TRT_INSTALL_HINT}")


def _int8(fp32, cfg, options: ExportOptions, log: Log):
    from edgekd.calib import build_calibration_set, calibrate
    from edgekd.export.int8 import QUANT_OP_TYPES, Int8Options, quantize_qdq

    calib_set = build_calibration_set(options.calib, cfg, num_images=options.calib_images, seed=options.seed)
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


def _export_engine(result, fp32, candidate, backbone, cfg, reference, inputs, pairs, options, log) -> None:
    """Build, inspect, gate and write the TensorRT engine (ONNX route) or torch-tensorrt program."""
    import tempfile

    from edgekd.atomic import atomic_path, file_sha256, write_json
    from edgekd.export.onnx import save_onnx
    from edgekd.export.readiness import check_readiness
    from edgekd.export.tensorrt import build_engine, import_tensorrt, trt_major
    from edgekd.utils.env import environment

    precision = options.precision
    trt_precision = "trt-fp32" if precision == "fp32" else precision
    if options.trt_via == "torch-tensorrt":
        _export_torch_tensorrt(result, backbone, cfg, reference, inputs, pairs, options, log)
        return
    if not result.readiness.ready:
        raise EdgekdError(f"{result.onnx.name} is not TensorRT-ready: {result.readiness.errors()[0].message}")
    trt = import_tensorrt()
    major = trt_major(trt)
    # TensorRT 10 takes precision from builder flags: parse the FP32 graph for fp32/fp16; 11 takes the typed graph.
    graph = fp32 if (major == 10 and precision == "fp16") else candidate
    if graph is not candidate and not check_readiness(graph).ready:
        raise EdgekdError("the FP32 graph is not TensorRT-ready")
    expected_int8 = None
    if precision == "int8":
        init = {t.name for t in candidate.graph.initializer}
        producers = {o: n for n in candidate.graph.node for o in n.output}
        expected_int8 = sum(
            1
            for n in candidate.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul")
            and len(n.input) > 1
            and n.input[1] not in init
            and producers.get(n.input[1]) is not None
            and producers[n.input[1]].op_type == "DequantizeLinear"
        )
    plan_path = result.onnx.with_suffix(".plan")
    with tempfile.TemporaryDirectory(prefix="edgekd-trt-") as tmpdir:
        onnx_path = Path(tmpdir) / "model.onnx"
        save_onnx(graph, onnx_path)
        log(
            f"building TensorRT {trt.__version__} {precision} engine (profile batch "
            f"{options.profile.min_batch}/{options.profile.opt_batch}/{options.profile.max_batch})"
        )
        built = build_engine(
            onnx_path,
            precision,
            tuple(cfg.input_size),
            options.profile,
            workspace_bytes=int(options.workspace_gib * (1 << 30)),
            timing_cache=options.timing_cache,
            optimization_level=options.optimization_level,
            expected_int8_layers=expected_int8,
        )
    log(f"engine layers by precision: {built.layers.get('compute_layers')} (all layers {built.layers.get('layers')})")
    from edgekd.export.runtime import TensorRTRuntime

    batches = tuple(b for b in options.gate_batches if b <= options.profile.max_batch) or (options.profile.max_batch,)
    gate_opts = ExportOptions(**{**asdict(options), "gate_batches": batches, "profile": options.profile})
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(built.plan)
        runtime = TensorRTRuntime(tmp, precision=precision)
        report = _run_gates(reference, runtime, inputs, trt_precision, plan_path.name, gate_opts, cfg, pairs, log)
        report.raise_if_failed()
    sidecar = plan_path.with_name(plan_path.name + ".json")
    write_json(
        sidecar,
        {
            "artifact": plan_path.name,
            "kind": "tensorrt-plan",
            "precision": precision,
            **built.meta(),
            "profile": asdict(options.profile),
            "input_shape": list(cfg.input_size),
            "model": cfg.to_dict(),
            "gpu": environment()["gpu"],
            "onnx": result.onnx.name,
            "onnx_sha256": file_sha256(result.onnx),
            "gate": report.to_dict(),
            "environment": environment(),
        },
    )
    log(f"wrote {plan_path} and {sidecar.name}")
    result.engine, result.engine_gate = plan_path, report
    result.sidecars.append(sidecar)


def _export_torch_tensorrt(result, backbone, cfg, reference, inputs, pairs, options, log) -> None:
    from edgekd.atomic import atomic_path, write_json
    from edgekd.errors import GateFailed
    from edgekd.export.tensorrt import check_layer_precisions
    from edgekd.export.torch_tensorrt import TorchTensorRTRuntime, compile_torch_tensorrt, save_torch_tensorrt
    from edgekd.utils.env import environment

    precision = options.precision
    log(f"compiling with torch-tensorrt [{precision}]")
    compiled, meta = compile_torch_tensorrt(
        backbone,
        tuple(cfg.input_size),
        precision,
        options.profile,
        workspace_bytes=int(options.workspace_gib * (1 << 30)),
        optimization_level=options.optimization_level,
        timing_cache=options.timing_cache,
    )
    census = meta["layers"]
    if census.get("detailed"):
        check_layer_precisions(census, precision)
        log(f"engine layers by precision: {census['compute_layers']}")
    else:
        meta["precision_check"] = "unavailable: torch-tensorrt exposed no detailed layer information"
        log("warning: torch-tensorrt exposed no per-layer types; precision checked by the parity gate only")
    runtime = TorchTensorRTRuntime(compiled, precision=precision)
    path = result.onnx.with_suffix(".trt.ep")
    batches = tuple(b for b in options.gate_batches if b <= options.profile.max_batch) or (options.profile.max_batch,)
    gate_opts = ExportOptions(**{**asdict(options), "gate_batches": batches, "profile": options.profile})
    report = _run_gates(
        reference,
        runtime,
        inputs,
        "trt-fp32" if precision == "fp32" else precision,
        path.name,
        gate_opts,
        cfg,
        pairs,
        log,
    )
    if not report.passed:
        raise GateFailed(f"{path.name} failed its {precision} gate: {'; '.join(report.failures)}")
    example = torch.randn(options.profile.opt_batch, *cfg.input_size)
    with atomic_path(path) as tmp:
        staged = tmp.with_suffix(".ep")  # torch_tensorrt.save picks the format from the suffix
        try:
            save_torch_tensorrt(compiled, staged, example)
            os.replace(staged, tmp)
        finally:
            staged.unlink(missing_ok=True)
    sidecar = path.with_name(path.name + ".json")
    write_json(
        sidecar,
        {
            "artifact": path.name,
            "kind": "torch-tensorrt-exported-program",
            "precision": precision,
            **meta,
            "profile": asdict(options.profile),
            "model": cfg.to_dict(),
            "gate": report.to_dict(),
            "environment": environment(),
        },
    )
    log(f"wrote {path} and {sidecar.name}")
    result.engine, result.engine_gate = path, report
    result.sidecars.append(sidecar)
