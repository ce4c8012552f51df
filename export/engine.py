"""The ``--trt`` routes of ``edgekd export``: build, inspect and gate a TensorRT engine from the gated ONNX (TensorRT's
ONNX parser), or compile the PyTorch model with torch-tensorrt (``--trt-via torch-tensorrt``).

Both write through ``edgekd.export.artifact.write_gated``, like the ONNX artifact: under a temporary name, gated from
there, renamed into place only when the gates pass, then the sidecar JSON. An engine is gated at the gate batch sizes
its optimization profile accepts, and an FP32 engine under the TF32-tolerant ``trt-fp32`` threshold. TensorRT and
torch-tensorrt are imported through ``edgekd.export.optional_deps``; ``check_trt_available`` fails in one line before
any work when they or a GPU are missing.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import onnx
import torch

from edgekd.errors import EdgekdError, MissingDependency
from edgekd.export.artifact import Artifact, Gates, write_gated
from edgekd.export.builders.tensorrt import build_engine, check_layer_precisions
from edgekd.export.builders.torch_tensorrt import compile_torch_tensorrt, save_torch_tensorrt
from edgekd.export.checks.readiness import ReadinessReport, check_readiness
from edgekd.export.optional_deps import TRT_INSTALL_HINT, import_tensorrt, import_torch_tensorrt, trt_major
from edgekd.export.options import ENGINE_ROUTES, ExportOptions
from edgekd.export.passes.onnx import save_onnx
from edgekd.export.passes.precisions import PRECISION_TABLE
from edgekd.export.runtimes import open_runtime
from edgekd.utils.env import environment
from edgekd.utils.hashing import file_sha256

__all__ = ["check_trt_available", "export_engine"]


def check_trt_available(options: ExportOptions) -> None:
    """Fail in one line before any work when the TensorRT route cannot run here."""
    if options.trt_via not in ENGINE_ROUTES:
        raise EdgekdError(f"--trt-via must be {' or '.join(ENGINE_ROUTES)}")
    if options.trt_via == "torch-tensorrt":
        import_torch_tensorrt()
    else:
        import_tensorrt()
    if not torch.cuda.is_available():
        raise MissingDependency(f"--trt needs an NVIDIA GPU and none is visible; {TRT_INSTALL_HINT}")


def export_engine(
    onnx_path: Path,
    readiness: ReadinessReport,
    *,
    fp32: onnx.ModelProto,
    candidate: onnx.ModelProto,
    backbone: torch.nn.Module,
    gates: Gates,
    options: ExportOptions,
) -> Artifact:
    """Build, inspect, gate and write the engine next to the gated ONNX ``onnx_path``: a TensorRT ``.plan`` from the
    ONNX graph (``fp32`` or ``candidate``, the graph written at ``onnx_path``, as the TensorRT version needs), or a
    torch-tensorrt ``.trt.ep`` program from ``backbone``."""
    if options.trt_via == "torch-tensorrt":
        return _torch_tensorrt_program(onnx_path.with_suffix(".trt.ep"), backbone, gates, options)
    if not readiness.ready:
        raise EdgekdError(f"{onnx_path.name} is not TensorRT-ready: {readiness.errors()[0].message}")
    return _tensorrt_plan(onnx_path, fp32, candidate, backbone.cfg, gates, options)


def _gate_settings(options: ExportOptions) -> dict:
    """``write_gated``'s gate arguments for an engine: only the gate batch sizes its optimization profile accepts (its
    largest if none fits), and the precision's engine gate (``trt-fp32`` for FP32: TensorRT may run FP32 layers with
    TF32 math)."""
    profile = options.profile
    batches = tuple(b for b in options.gate_batches if b <= profile.max_batch) or (profile.max_batch,)
    return {"gate_as": PRECISION_TABLE[options.precision].engine_gate, "gate_batches": batches}


def _expected_int8_layers(graph: onnx.ModelProto) -> int:
    """Weighted layers (Conv/Gemm/MatMul) whose weight comes out of a DequantizeLinear: what TensorRT should run in
    INT8 (none in a graph without Q/DQ)."""
    init = {t.name for t in graph.graph.initializer}
    producers = {o: n for n in graph.graph.node for o in n.output}
    return sum(
        1
        for n in graph.graph.node
        if n.op_type in ("Conv", "Gemm", "MatMul")
        and len(n.input) > 1
        and n.input[1] not in init
        and producers.get(n.input[1]) is not None
        and producers[n.input[1]].op_type == "DequantizeLinear"
    )


def _tensorrt_plan(onnx_path: Path, fp32, candidate, cfg, gates: Gates, options: ExportOptions) -> Artifact:
    precision = options.precision
    trt = import_tensorrt()
    major = trt_major(trt)
    # TensorRT 10 takes precision from builder flags: it parses the FP32 graph where the precision says so; 11 takes the
    # typed graph.
    graph = fp32 if (major == 10 and PRECISION_TABLE[precision].trt10_parses_fp32) else candidate
    if graph is not candidate and not check_readiness(graph).ready:
        raise EdgekdError("the FP32 graph is not TensorRT-ready")
    expected_int8 = _expected_int8_layers(candidate)
    with tempfile.TemporaryDirectory(prefix="edgekd-trt-") as tmpdir:
        parsed = Path(tmpdir) / "model.onnx"
        save_onnx(graph, parsed)
        gates.log(
            f"building TensorRT {trt.__version__} {precision} engine (profile batch "
            f"{options.profile.min_batch}/{options.profile.opt_batch}/{options.profile.max_batch})"
        )
        built = build_engine(
            parsed,
            precision,
            tuple(cfg.input_size),
            options.profile,
            workspace_bytes=int(options.workspace_gib * (1 << 30)),
            timing_cache=options.timing_cache,
            optimization_level=options.optimization_level,
            expected_int8_layers=expected_int8,
        )
    gates.log(
        f"engine layers by precision: {built.layers.get('compute_layers')} (all layers {built.layers.get('layers')})"
    )
    return write_gated(
        onnx_path.with_suffix(".plan"),
        lambda tmp: tmp.write_bytes(built.plan),
        lambda tmp: open_runtime(tmp, "tensorrt", precision=precision),
        gates,
        kind="tensorrt-plan",
        precision=precision,
        sidecar={
            **built.meta(),
            "profile": asdict(options.profile),
            "input_shape": list(cfg.input_size),
            "model": cfg.to_dict(),
            "gpu": environment()["gpu"],
            "onnx": onnx_path.name,
            "onnx_sha256": file_sha256(onnx_path),
        },
        **_gate_settings(options),
    )


def _torch_tensorrt_program(path: Path, backbone: torch.nn.Module, gates: Gates, options: ExportOptions) -> Artifact:
    cfg = backbone.cfg
    precision = options.precision
    gates.log(f"compiling with torch-tensorrt [{precision}]")
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
        gates.log(f"engine layers by precision: {census['compute_layers']}")
    else:
        meta["precision_check"] = "unavailable: torch-tensorrt exposed no detailed layer information"
        gates.log("warning: torch-tensorrt exposed no per-layer types; precision checked by the parity gate only")
    example = torch.randn(options.profile.opt_batch, *cfg.input_size)

    def write(tmp: Path) -> None:
        staged = tmp.with_suffix(".ep")  # torch_tensorrt.save picks the format from the suffix
        try:
            save_torch_tensorrt(compiled, staged, example)
            os.replace(staged, tmp)
        finally:
            staged.unlink(missing_ok=True)

    # The gates run the compiled program that was just saved, in memory: reading the file back needs torch-tensorrt's
    # loader, which this route has never been run through on a GPU.
    return write_gated(
        path,
        write,
        lambda _tmp: open_runtime(compiled, "torch-tensorrt", precision=precision),
        gates,
        kind="torch-tensorrt-exported-program",
        precision=precision,
        sidecar={**meta, "profile": asdict(options.profile), "model": cfg.to_dict()},
        **_gate_settings(options),
    )
