"""The export precisions, one ``Precision`` each in ``PRECISION_TABLE``: the graph pass that makes the precision from
the exported FP32 graph, and everything else in which precisions differ (the parity gate, calibration, the gate images,
the default task-gate pairs, TensorRT 10's builder flags, the torch-tensorrt route, a note for ONNX Runtime CPU).

The rest of ``edgekd.export`` reads this table instead of comparing precision names: ``--precision``'s choices
(``edgekd.export.options.PRECISIONS``) and help, the pipeline, the gates' ``THRESHOLDS`` and the engine builders. A
new precision is one entry here, its pass in ``edgekd.export.passes`` and its tests (CONTRIBUTING.md, "Add an export
precision").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import onnx
import torch

from edgekd.export.passes.fp16 import convert_fp16
from edgekd.export.passes.int8 import Int8Options, quantize_qdq
from edgekd.export.passes.onnx import set_metadata

if TYPE_CHECKING:
    from edgekd.calib import CalibrationResult

__all__ = ["GraphPass", "Precision", "PRECISION_TABLE", "INT8_CPU_NOTE"]

# (the exported FP32 graph, calibrated ranges or None, the Q/DQ settings) -> the precision's graph
GraphPass = Callable[[onnx.ModelProto, "CalibrationResult | None", Int8Options], onnx.ModelProto]

# BENCHMARKS.md "Export and latency" (mbf, 1 thread, batch 1): ORT CPU FP32 9.62 ms, INT8 S8S8 14.99 ms, U8S8 13.14 ms.
INT8_CPU_NOTE = (
    "INT8 Q/DQ on ONNX Runtime's CPU provider is usually slower than FP32 (BENCHMARKS.md: mbf 1 thread batch 1, "
    "14.99 ms INT8 vs 9.62 ms FP32); it is meant for TensorRT and other INT8 accelerators"
)


@dataclass(frozen=True)
class Precision:
    """One export precision.

    Attributes:
        name: as on the command line (``--precision``), in file names and in the ``precision`` metadata.
        summary: what its ONNX artifact is, for ``--precision``'s help.
        make: its graph pass (``GraphPass``); the FP32 graph it is given is not modified.
        statistic: what the parity gate judges of the per-row cosines to PyTorch FP32, ``min`` or ``mean``.
        min_cosine: the least value of that statistic an artifact passes with (SPEC §6, reference/export.md §4.2).
        engine_min_cosine: a TensorRT engine's least value where it differs from ``min_cosine``; such engines are gated
            as ``trt-<name>`` (``engine_gate``). None: an engine passes the same gate as the ONNX file.
        needs_calibration: its pass needs calibrated ranges, so ``--calib`` is required.
        noise_gate: the parity gate runs uniform-noise images too (parity must hold for any input); off for a
            precision whose ranges are calibrated on face images.
        default_pairs: the task-gate pairs without ``--pairs`` (None: no task gate), for a precision judged by the
            task gate more than by parity (INT8, reference/export.md §4.2).
        trt10_flags: the builder flags TensorRT 10 needs for it (10 is weakly typed: the flags allow each layer's
            precision; 11 has no such flags and builds the graph's own types).
        trt10_parses_fp32: TensorRT 10 parses the FP32 graph (plus ``trt10_flags``) instead of this precision's graph.
        torch_dtype: what ``--trt-via torch-tensorrt`` runs the model in (float32 in and out); None: that route does
            not offer it.
        ort_cpu_note: said when it is exported without ``--trt``: where it disappoints on ONNX Runtime's CPU provider.
    """

    name: str
    summary: str
    make: GraphPass
    statistic: Literal["min", "mean"]
    min_cosine: float
    engine_min_cosine: float | None = None
    needs_calibration: bool = False
    noise_gate: bool = True
    default_pairs: str | None = None
    trt10_flags: tuple[str, ...] = ()
    trt10_parses_fp32: bool = False
    torch_dtype: torch.dtype | None = None
    ort_cpu_note: str | None = None

    @property
    def engine_gate(self) -> str:
        """The ``THRESHOLDS`` key its TensorRT engines are gated under."""
        return self.name if self.engine_min_cosine is None else f"trt-{self.name}"


def _as_exported(fp32: onnx.ModelProto, ranges: CalibrationResult | None, int8: Int8Options) -> onnx.ModelProto:
    return fp32


def _fp16(fp32: onnx.ModelProto, ranges: CalibrationResult | None, int8: Int8Options) -> onnx.ModelProto:
    graph = convert_fp16(fp32)
    set_metadata(graph, {"precision": "fp16"})
    return graph


PRECISION_TABLE: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision(
            name="fp32",
            summary="the graph as exported",
            make=_as_exported,
            statistic="min",
            min_cosine=0.99999,
            engine_min_cosine=0.9999,  # TensorRT may run FP32 layers with TF32 math
            torch_dtype=torch.float32,
        ),
        Precision(
            name="fp16",
            summary="FP16-typed graph with FP32 I/O",
            make=_fp16,
            statistic="min",
            min_cosine=0.999,
            trt10_flags=("FP16",),
            trt10_parses_fp32=True,
            torch_dtype=torch.float16,
        ),
        Precision(
            name="int8",
            summary="explicit Q/DQ graph",
            make=quantize_qdq,
            statistic="mean",
            min_cosine=0.995,
            needs_calibration=True,
            noise_gate=False,
            default_pairs="synthetic",
            trt10_flags=("INT8", "FP16"),  # FP16 too, so the layers left in float may run in FP16
            ort_cpu_note=INT8_CPU_NOTE,
        ),
    )
}
