"""FP32 ONNX + calibrated ranges -> explicit Q/DQ INT8 ONNX with TensorRT-friendly placement.

ONNX Runtime's ``quantize_static`` does the rewriting; this module chooses its settings so the result is what
TensorRT's explicit-quantization path wants (reference/export.md §2.2):

- symmetric INT8 for activations and weights (all zero-points 0), weights per output channel;
- Q/DQ on the *inputs* of Conv / Gemm / MatMul and of residual Add, never on Conv/Gemm outputs, so a Conv feeds its
  PReLU directly and TensorRT can fuse Conv+bias+activation (``OpTypesToExcludeOutputQuantization``);
- biases stay float (``QuantizeBias=False``): TensorRT rejects an INT32 ``DequantizeLinear``;
- PReLU, BatchNorm and the rest stay in float; the first ``keep_first`` and last ``keep_last`` quantizable layers too
  (the stem and the embedding layer are the most sensitive in face models, face.md §6.3).

``activations="uint8"`` gives asymmetric U8 activations instead, which ONNX Runtime's x86 CPU kernels run faster but
TensorRT does not accept; ``readiness`` flags such a graph.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from edgekd.errors import EdgekdError
from edgekd.export.passes.onnx import name_batch_axis, set_metadata

__all__ = ["QUANT_OP_TYPES", "WEIGHT_OP_TYPES", "ACTIVATION_TYPES", "Int8Options", "quantizable_nodes", "quantize_qdq"]

QUANT_OP_TYPES = ("Conv", "Gemm", "MatMul", "Add")
WEIGHT_OP_TYPES = ("Conv", "Gemm", "MatMul")  # the "layers" that keep_first / keep_last count
ACTIVATION_TYPES = ("int8", "uint8")  # symmetric (TensorRT), asymmetric (ONNX Runtime CPU)


@dataclass
class Int8Options:
    """Settings of the Q/DQ rewrite.

    Attributes:
        keep_first: leading weighted layers (Conv/Gemm/MatMul, in graph order) left in float.
        keep_last: trailing weighted layers left in float.
        exclude: more node names left in float.
        per_channel: per-output-channel weight scales.
        activations: ``int8`` (symmetric, TensorRT) or ``uint8`` (asymmetric, ONNX Runtime CPU).
        op_types: node types that get Q/DQ inputs.
    """

    keep_first: int = 1
    keep_last: int = 1
    exclude: list[str] = field(default_factory=list)
    per_channel: bool = True
    activations: str = "int8"
    op_types: tuple[str, ...] = QUANT_OP_TYPES


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the weighted layers (Conv/Gemm/MatMul with a constant weight), in graph order."""
    init = {t.name for t in model.graph.initializer}
    return [
        n.name for n in model.graph.node if n.op_type in WEIGHT_OP_TYPES and len(n.input) > 1 and n.input[1] in init
    ]


def _kept_nodes(model: onnx.ModelProto, options: Int8Options) -> list[str]:
    layers = quantizable_nodes(model)
    if options.keep_first < 0 or options.keep_last < 0:
        raise EdgekdError("--keep-first / --keep-last must be >= 0")
    if options.keep_first + options.keep_last > len(layers):
        raise EdgekdError(
            f"keeping {options.keep_first} first and {options.keep_last} last layers in float leaves "
            f"nothing to quantize (the model has {len(layers)} weighted layers)"
        )
    kept = layers[: options.keep_first] + (layers[len(layers) - options.keep_last :] if options.keep_last else [])
    names = {n.name for n in model.graph.node}
    unknown = [n for n in options.exclude if n not in names]
    if unknown:
        raise EdgekdError(f"--int8-exclude names unknown nodes: {', '.join(unknown[:3])}")
    return kept + list(options.exclude)


@contextlib.contextmanager
def _quiet_ort_logging():
    """ORT's quantizer logs advice through the root logger; keep the CLI output to our own report."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def quantize_qdq(model: onnx.ModelProto, calibration, options: Int8Options | None = None) -> onnx.ModelProto:
    """Rewrite ``model`` into a Q/DQ INT8 model using the cached ranges of ``calibration``.

    Args:
        model: the FP32 ONNX model the ranges were computed on (its node and tensor names must match).
        calibration: an ``edgekd.calib.CalibrationResult``.
        options: placement and type settings.

    Returns:
        The quantized model; its metadata says ``precision=int8`` plus the settings used.
    """
    # onnxruntime is loaded when a model is quantized, not with edgekd.export (start-up time)
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    options = options or Int8Options()
    if options.activations not in ACTIVATION_TYPES:
        raise EdgekdError("int8 activations must be 'int8' (TensorRT) or 'uint8' (ONNX Runtime CPU)")
    symmetric = options.activations == "int8"
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[calibration.method]
    kept = _kept_nodes(model, options)
    extra = {
        "ActivationSymmetric": symmetric,
        "WeightSymmetric": True,
        "OpTypesToExcludeOutputQuantization": list(WEIGHT_OP_TYPES),
        "QuantizeBias": False,
        "DedicatedQDQPair": False,
    }
    inferred = onnx.shape_inference.infer_shapes(model)
    with tempfile.TemporaryDirectory(prefix="edgekd-int8-") as tmp, _quiet_ort_logging():
        out = Path(tmp) / "int8.onnx"
        try:
            quantize_static(
                inferred,
                str(out),
                calibration_data_reader=None,
                calibration_cache_path=str(calibration.path),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(options.op_types),
                per_channel=options.per_channel,
                reduce_range=False,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=kept,
                calibrate_method=method,
                extra_options=extra,
            )
        except (ValueError, KeyError, RuntimeError) as exc:
            raise EdgekdError(f"INT8 quantization failed: {str(exc).splitlines()[0][:300]}") from exc
        quantized = onnx.load(str(out))
    del quantized.graph.value_info[:]
    name_batch_axis(quantized)
    set_metadata(quantized, {p.key: p.value for p in model.metadata_props})
    set_metadata(
        quantized,
        {
            "precision": "int8",
            "int8_activations": options.activations,
            "int8_per_channel": str(options.per_channel).lower(),
            "int8_kept_float": ",".join(kept),
            "calibration_method": calibration.method,
            "calibration_key": calibration.key,
        },
    )
    onnx.checker.check_model(quantized, full_check=True)
    return quantized
