"""The ``--trt`` half of ``edgekd export``: build, inspect, gate and write a TensorRT engine from the gated ONNX
(TensorRT's ONNX parser), or compile the PyTorch model with torch-tensorrt (``--trt-via torch-tensorrt``).

Like the ONNX artifact, an engine is written under a temporary name, gated from there and renamed into place only when
its gates pass. TensorRT and torch-tensorrt are imported lazily; ``check_trt_available`` fails in one line before any
work when they or a GPU are missing.
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path

import torch

from edgekd.errors import EdgekdError
from edgekd.export.pipeline import ExportOptions, run_gates

__all__ = ["check_trt_available", "export_engine"]


def check_trt_available(options: ExportOptions) -> None:
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


def export_engine(result, fp32, candidate, backbone, cfg, reference, inputs, pairs, options, log) -> None:
    """Build, inspect, gate and write the TensorRT engine (ONNX route) or torch-tensorrt program."""
    import tempfile

    from edgekd.atomic import atomic_path, file_sha256, write_json
    from edgekd.export.onnx import save_onnx
    from edgekd.export.readiness import check_readiness
    from edgekd.export.tensorrt import build_engine, import_tensorrt, trt_major
    from edgekd.utils.env import environment

    precision = options.precision
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

    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(built.plan)
        runtime = TensorRTRuntime(tmp, precision=precision)
        report = _run_engine_gates(reference, runtime, inputs, plan_path.name, options, cfg, pairs, log)
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
    report = _run_engine_gates(reference, runtime, inputs, path.name, options, cfg, pairs, log)
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


def _run_engine_gates(reference, runtime, inputs, artifact, options: ExportOptions, cfg, pairs, log):
    """``run_gates`` for an engine: only the batch sizes its optimization profile accepts (its largest if none of the
    gate batches fits), under the ``trt-fp32`` label for FP32 so the TF32-tolerant threshold applies."""
    profile = options.profile
    batches = tuple(b for b in options.gate_batches if b <= profile.max_batch) or (profile.max_batch,)
    label = "trt-fp32" if options.precision == "fp32" else options.precision
    gate_options = replace(options, gate_batches=batches)
    return run_gates(reference, runtime, inputs, label, artifact, gate_options, cfg, pairs, log)
