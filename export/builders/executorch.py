"""PyTorch -> ExecuTorch program (``.pte``) for the XNNPACK backend: FP32, or INT8 through PT2E quantization.

The route (``edgekd export --target executorch``): ``torch.export`` at batch 1 (a static shape: the program is meant for
one face at a time on a phone, and XNNPACK plans its memory for it), for INT8 the PT2E flow with ExecuTorch's
``XNNPACKQuantizer`` (symmetric INT8, per-channel weights, histogram-observed activations) calibrated on edgekd's
calibration set one image at a time (the exported program guards its batch of 1), then ``to_edge_transform_and_lower``
with the XNNPACK partitioner and ``to_executorch``. The model's metadata travels inside the program as constant methods
that return its ``model_metadata`` strings, the same keys and values an ONNX export carries in ``metadata_props``.

A lowering in which XNNPACK runs nothing, or leaves a convolution or matrix multiply to ExecuTorch's portable kernels
(reference C++ loops, many times slower, and in float for an INT8 model), raises ``GateFailed`` before anything is
written: ``delegation_census`` counts what the lowered program delegates. ExecuTorch and torchao are imported through
``edgekd.export.optional_deps`` (the ``executorch`` extra).
"""

from __future__ import annotations

import operator
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
import torch

from edgekd.errors import EdgekdError, GateFailed, MissingDependency
from edgekd.export.optional_deps import EXECUTORCH_INSTALL_HINT, import_executorch

__all__ = [
    "EXECUTORCH_PRECISIONS",
    "XNNPACK_BACKEND",
    "QUANTIZER",
    "DelegationCensus",
    "ExecuTorchProgram",
    "check_executorch_available",
    "executorch_versions",
    "delegation_census",
    "check_delegation",
    "build_executorch_program",
]

EXECUTORCH_PRECISIONS = ("fp32", "int8")  # what XNNPACK runs of PRECISION_TABLE (its FP16 path is not offered here)
XNNPACK_BACKEND = "XnnpackBackend"  # the backend id of XNNPACK's lowered modules and of the runtime's registry
QUANTIZER = "XNNPACKQuantizer: symmetric int8, per-channel weights, HistogramObserver activations"
# operators (name prefixes, as _op_name writes them) that must run inside XNNPACK: the model's multiply-adds
COMPUTE_OPS = ("aten.conv", "aten.linear", "aten.addmm", "aten.mm", "aten.bmm", "aten.matmul")
Log = Callable[[str], None]


@dataclass
class DelegationCensus:
    """What a lowered program runs where.

    Attributes:
        subgraphs: XNNPACK delegate calls (lowered subgraphs) in the program.
        delegated: operator name -> count, inside XNNPACK's subgraphs.
        outside: operator name -> count, left to ExecuTorch's portable kernels (other backends' subgraphs too).
    """

    subgraphs: int
    delegated: dict[str, int] = field(default_factory=dict)
    outside: dict[str, int] = field(default_factory=dict)

    @property
    def outside_compute(self) -> dict[str, int]:
        """The convolutions and matrix multiplies left outside XNNPACK."""
        return {op: n for op, n in self.outside.items() if op.startswith(COMPUTE_OPS)}

    def to_dict(self) -> dict[str, Any]:
        return {"subgraphs": self.subgraphs, "delegated": self.delegated, "outside": self.outside}

    def format(self) -> str:
        """One line: how many operators XNNPACK runs, in how many subgraphs, and what it leaves outside."""
        inside = sum(self.delegated.values())
        outside = ", ".join(f"{op} x{n}" for op, n in sorted(self.outside.items())) or "nothing"
        return f"XNNPACK runs {inside} operators in {self.subgraphs} subgraph(s); left outside: {outside}"


@dataclass
class ExecuTorchProgram:
    """A lowered program: the ``.pte`` bytes, its delegation census and the seconds each stage took."""

    data: bytes
    census: DelegationCensus
    seconds: dict[str, float]


def check_executorch_available() -> None:
    """Fail in one line before any work when the ``executorch`` extra is missing: the lowering and the runtime that
    gates its program, with XNNPACK registered."""
    import_executorch("executorch.exir")
    runtime = import_executorch("executorch.runtime").Runtime.get()
    if not runtime.backend_registry.is_available(XNNPACK_BACKEND):
        raise MissingDependency(f"this ExecuTorch runtime has no XNNPACK backend; {EXECUTORCH_INSTALL_HINT}")


def executorch_versions() -> dict[str, str | None]:
    """The installed versions of the packages a program is built with (the sidecar records them)."""
    versions: dict[str, str | None] = {}
    for dist in ("executorch", "torchao"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _op_name(target: Any) -> str:
    """An ATen or edge-dialect operator's qualified name, ``aten.convolution`` or ``aten.add.Tensor`` (the overload
    named unless it is the default), the same in both dialects (their ``str`` differs)."""
    name = getattr(target, "_name", None) or getattr(target, "__name__", None) or str(target)
    return str(name).replace("::", ".").removeprefix("edge.")


def _is_delegate_call(node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "executorch_call_delegate"


def delegation_census(graph_module: torch.fx.GraphModule) -> DelegationCensus:
    """Count the operators of a lowered program's top-level graph (``EdgeProgramManager.exported_program()``) that run
    inside XNNPACK's subgraphs and those left outside them."""
    delegated: Counter[str] = Counter()
    outside: Counter[str] = Counter()
    subgraphs = 0
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if not _is_delegate_call(node):
            outside[_op_name(node.target)] += 1
            continue
        lowered = getattr(graph_module, node.args[0].target)
        ops = Counter(
            _op_name(inner.target)
            for inner in lowered.original_module.graph.nodes
            if inner.op == "call_function" and inner.target is not operator.getitem
        )
        if lowered.backend_id == XNNPACK_BACKEND:
            subgraphs += 1
            delegated.update(ops)
        else:
            outside.update(ops)
    return DelegationCensus(subgraphs, dict(delegated), dict(outside))


def check_delegation(census: DelegationCensus, artifact: str) -> None:
    """Raise ``GateFailed`` unless XNNPACK runs the model: at least one subgraph, and every convolution and matrix
    multiply inside one."""
    if not census.subgraphs or not census.delegated:
        raise GateFailed(f"{artifact} failed its XNNPACK delegation check: XNNPACK runs none of its operators")
    left = census.outside_compute
    if left:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(left.items()))
        raise GateFailed(f"{artifact} failed its XNNPACK delegation check: {ops} left to ExecuTorch's portable kernels")


def _partitioners() -> list:
    """The partitioners the program is lowered with (a module function, so that the tests can swap in a partitioner
    that delegates nothing and see the delegation check refuse it)."""
    partition = import_executorch("executorch.backends.xnnpack.partition.xnnpack_partitioner")
    return [partition.XnnpackPartitioner()]


def _export(model: torch.nn.Module, example: torch.Tensor):
    """``torch.export`` of ``model`` at ``example``'s static shape; a failure is one line."""
    try:
        with torch.no_grad():
            return torch.export.export(model, (example,))
    except Exception as exc:  # torch.export raises many types; the user needs the first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgekdError(f"torch.export for ExecuTorch failed: {first[:300]}") from exc


def _quantize_pt2e(exported, example: torch.Tensor, calib_images: np.ndarray) -> torch.nn.Module:
    """The PT2E INT8 model: ``exported`` annotated by the XNNPACK quantizer, observed on ``calib_images`` (normalized
    ``(N, C, H, W)``) one at a time, and converted to quantize/dequantize pairs around the quantized operators."""
    quantizer_module = import_executorch("executorch.backends.xnnpack.quantizer.xnnpack_quantizer")
    pt2e = import_executorch("torchao.quantization.pt2e.quantize_pt2e")
    quantizer = quantizer_module.XNNPACKQuantizer().set_global(
        quantizer_module.get_symmetric_quantization_config(is_per_channel=True)
    )
    prepared = pt2e.prepare_pt2e(exported.module(), quantizer)
    with torch.no_grad():
        for image in calib_images:
            prepared(torch.from_numpy(np.ascontiguousarray(image[None])).to(example.dtype))
    return pt2e.convert_pt2e(prepared)


def build_executorch_program(
    model: torch.nn.Module,
    input_size: tuple[int, int, int],
    precision: str,
    metadata: Mapping[str, str],
    *,
    calib_images: np.ndarray | None = None,
    artifact: str = "the program",
    log: Log | None = None,
) -> ExecuTorchProgram:
    """Lower ``model`` (normalized ``(1, C, H, W)`` -> ``(1, D)``) to an XNNPACK ExecuTorch program.

    Args:
        model: the backbone in eval mode, FP32, on the CPU.
        input_size: ``(C, H, W)``.
        precision: one of ``EXECUTORCH_PRECISIONS``.
        metadata: the model's metadata (``edgekd.export.passes.onnx.model_metadata``), stored as constant methods.
        calib_images: normalized calibration images; INT8 needs them.
        artifact: the name the delegation check reports.
        log: receives a line per stage.

    Raises:
        GateFailed: XNNPACK does not run the model (``check_delegation``).
        EdgekdError: an unknown precision, INT8 without calibration images, or a failed ``torch.export``.
        MissingDependency: the ``executorch`` extra is not installed.
    """
    if precision not in EXECUTORCH_PRECISIONS:
        raise EdgekdError(f"ExecuTorch programs are {' or '.join(EXECUTORCH_PRECISIONS)}, not {precision}")
    if precision == "int8" and (calib_images is None or not len(calib_images)):
        raise EdgekdError("an INT8 ExecuTorch program needs calibration images")
    log = log or (lambda _msg: None)
    exir = import_executorch("executorch.exir")
    seconds: dict[str, float] = {}
    example = torch.zeros(1, *input_size)
    start = time.perf_counter()
    exported = _export(model.eval(), example)
    seconds["export"] = round(time.perf_counter() - start, 2)
    if precision == "int8":
        start = time.perf_counter()
        exported = _export(_quantize_pt2e(exported, example, calib_images), example)
        seconds["quantize"] = round(time.perf_counter() - start, 2)
    log(f"lowering to ExecuTorch with the XNNPACK partitioner [{precision}]")
    start = time.perf_counter()
    edge = exir.to_edge_transform_and_lower(exported, partitioner=_partitioners(), constant_methods=dict(metadata))
    census = delegation_census(edge.exported_program().graph_module)
    log(census.format())
    check_delegation(census, artifact)
    data = edge.to_executorch().buffer
    seconds["lower"] = round(time.perf_counter() - start, 2)
    return ExecuTorchProgram(data=bytes(data), census=census, seconds=seconds)
