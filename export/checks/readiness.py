"""TensorRT readiness of an ONNX model, checked without TensorRT: operators, opset, types, dynamic axes, Q/DQ placement.

The operator table is TensorRT's ONNX parser support matrix (onnx-tensorrt ``docs/operators.md``, TensorRT 10.15 /
11.x); opset ranges per parser version are from the same source and reference/export.md §1.6. The Q/DQ rules are the
explicit-quantization ones of reference/export.md §2.2: symmetric INT8 (zero-point 0), per-channel weights on the
output-channel axis, no INT32 bias dequantization, and no quantized Conv/Gemm outputs in front of an activation
(TensorRT then cannot fuse Conv + bias + activation).

``check_readiness`` never raises on a bad model: it returns findings with levels ``error`` (the parser or the
builder will refuse it), ``warn`` (it builds, but slower or with caveats) and ``info``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from edgekd.export.passes.onnx import load_onnx

__all__ = ["TRT_SUPPORTED_OPS", "TRT_OPSET_RANGES", "Finding", "ReadinessReport", "check_readiness"]

# Operators TensorRT's ONNX parser imports (support matrix of TensorRT 10.15 / 11.x, default domain).
TRT_SUPPORTED_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization BlackmanWindow
    Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
    DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
    GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
    GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
    InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
    LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression
    NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
    ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
    RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
    Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter
    ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)
# parser -> inclusive opset range it imports
TRT_OPSET_RANGES = {"10.0": (9, 20), "10.15": (9, 24), "11.x": (9, 25)}
_QUANT_IN_TYPES = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4}
_ACTIVATIONS = {"Relu", "PRelu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSwish", "Gelu", "Elu", "Selu"}


@dataclass
class Finding:
    """One readiness observation."""

    level: str  # error | warn | info
    check: str  # operators | opset | dtypes | shapes | qdq | batchnorm | metadata
    message: str


@dataclass
class ReadinessReport:
    """All findings for one model; ``ready`` is False when any finding is an error."""

    model: str
    opset: int
    op_counts: dict[str, int]
    findings: list[Finding] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not any(f.level == "error" for f in self.findings)

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ready": self.ready}

    def format(self) -> str:
        """A short report: verdict, op census, then one line per finding."""
        ops = ", ".join(f"{op}x{n}" for op, n in sorted(self.op_counts.items(), key=lambda kv: -kv[1]))
        verdict = "ready" if self.ready else f"NOT ready ({len(self.errors())} error(s))"
        lines = [f"TensorRT readiness of {self.model}: {verdict}", f"  opset {self.opset}; nodes: {ops}"]
        for f in sorted(self.findings, key=lambda f: ("error", "warn", "info").index(f.level)):
            lines.append(f"  [{f.level}] {f.check}: {f.message}")
        return "\n".join(lines)


def check_readiness(model: onnx.ModelProto | str | os.PathLike, name: str | None = None) -> ReadinessReport:
    """Check ``model`` (a proto or a path) against TensorRT's ONNX parser rules; see the module docstring."""
    if not isinstance(model, onnx.ModelProto):
        name = name or str(model)
        model = load_onnx(model)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    report = ReadinessReport(
        model=name or graph.name or "model", opset=opset, op_counts=dict(Counter(n.op_type for n in graph.node))
    )
    add = report.findings.append
    _check_opset(opset, model, add)
    _check_operators(graph, add)
    inferred = _infer(model)
    _check_dtypes(graph, inferred, add)
    _check_shapes(graph, add)
    _check_qdq(graph, add)
    bns = report.op_counts.get("BatchNormalization", 0)
    if bns:
        add(
            Finding(
                "info",
                "batchnorm",
                f"{bns} BatchNormalization node(s) not folded (they precede a zero-padded "
                "Conv, where folding is not exact); TensorRT runs them as Scale layers",
            )
        )
    keys = {p.key for p in model.metadata_props}
    missing = [k for k in ("input_size", "mean", "std", "embed_dim") if k not in keys]
    if missing:
        add(
            Finding(
                "warn", "metadata", f"no {', '.join(missing)} in metadata_props; consumers must guess the preprocessing"
            )
        )
    return report


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # an invalid graph still gets the other checks
        return model


def _check_opset(opset: int, model: onnx.ModelProto, add) -> None:
    lo, hi = TRT_OPSET_RANGES["11.x"]
    if not lo <= opset <= hi:
        add(Finding("error", "opset", f"opset {opset} is outside every TensorRT parser's range ({lo}-{hi})"))
    elif opset > TRT_OPSET_RANGES["10.0"][1]:
        newer = [v for v, (a, b) in TRT_OPSET_RANGES.items() if a <= opset <= b]
        add(
            Finding(
                "warn",
                "opset",
                f"opset {opset} needs a TensorRT parser from {newer[0]} on (TensorRT 10.0-10.x "
                "on Jetson/JetPack 6 imports 9-20); export with --opset 20 or lower",
            )
        )
    else:
        add(Finding("info", "opset", f"opset {opset}: imported by TensorRT 10.0+ and 11.x parsers"))
    others = sorted({o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx")})
    if others:
        add(Finding("warn", "opset", f"extra operator domains {', '.join(others)} (need TensorRT plugins)"))


def _check_operators(graph: onnx.GraphProto, add) -> None:
    bad = Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in graph.node
        if n.domain not in ("", "ai.onnx") or n.op_type not in TRT_SUPPORTED_OPS
    )
    if bad:
        listed = ", ".join(f"{op} (x{n})" for op, n in sorted(bad.items()))
        add(Finding("error", "operators", f"not supported by TensorRT's ONNX parser: {listed}"))
    else:
        add(Finding("info", "operators", f"all {len(graph.node)} nodes use operators TensorRT's parser supports"))


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in [*g.value_info, *g.input, *g.output]:
        types[v.name] = v.type.tensor_type.elem_type
    return types


def _check_dtypes(graph: onnx.GraphProto, inferred: onnx.ModelProto, add) -> None:
    types = _elem_types(inferred)
    doubles = sorted(n for n, t in types.items() if t == TensorProto.DOUBLE)
    if doubles:
        add(
            Finding(
                "warn",
                "dtypes",
                f"{len(doubles)} float64 tensor(s) (e.g. {doubles[0]}); TensorRT casts them to float32",
            )
        )
    io_names = {v.name for v in [*graph.input, *graph.output]}
    uint8 = sorted(n for n, t in types.items() if t == TensorProto.UINT8 and n not in io_names)
    if uint8:
        add(
            Finding(
                "error",
                "dtypes",
                f"{len(uint8)} uint8 tensor(s) inside the graph (e.g. {uint8[0]}); TensorRT "
                "takes uint8 only as network input/output (asymmetric uint8 quantization "
                "is for ONNX Runtime CPU)",
            )
        )
    for v in [*graph.input, *graph.output]:
        if v.type.tensor_type.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            add(
                Finding(
                    "warn",
                    "dtypes",
                    f"{v.name} is {TensorProto.DataType.Name(v.type.tensor_type.elem_type)}, not float32/float16",
                )
            )


def _check_shapes(graph: onnx.GraphProto, add) -> None:
    for v in [*graph.input, *graph.output]:
        dims = v.type.tensor_type.shape.dim
        kind = "input" if v in graph.input else "output"
        if not dims:
            add(Finding("warn", "shapes", f"{kind} {v.name} has no shape"))
            continue
        first = dims[0]
        if first.HasField("dim_value"):
            add(
                Finding(
                    "warn",
                    "shapes",
                    f"{kind} {v.name} has a fixed batch of {first.dim_value}; TensorRT profiles cannot vary it",
                )
            )
        rest = [d.dim_param or "?" for d in dims[1:] if not d.HasField("dim_value")]
        if rest:
            add(
                Finding(
                    "warn",
                    "shapes",
                    f"{kind} {v.name} has dynamic non-batch axes ({', '.join(rest)}); each needs "
                    "a min/opt/max range in the optimization profile",
                )
            )
        if not first.HasField("dim_value") and not rest:
            add(
                Finding(
                    "info",
                    "shapes",
                    f"{kind} {v.name}: dynamic batch axis '{first.dim_param or '?'}', other axes static",
                )
            )


def _check_qdq(graph: onnx.GraphProto, add) -> None:
    q_nodes = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    dq_nodes = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    if not q_nodes and not dq_nodes:
        return
    init = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    problems: list[Finding] = []
    for n in q_nodes + dq_nodes:
        if len(n.input) > 2 and n.input[2] in init:
            zp = numpy_helper.to_array(init[n.input[2]])
            if np.any(zp != 0):
                problems.append(
                    Finding("error", "qdq", f"{n.name}: non-zero zero-point; TensorRT needs symmetric quantization")
                )
                break
    for n in dq_nodes:
        src = init.get(n.input[0])
        if src is not None and src.data_type not in _QUANT_IN_TYPES:
            problems.append(
                Finding(
                    "error",
                    "qdq",
                    f"{n.name}: dequantizes a {TensorProto.DataType.Name(src.data_type)}"
                    " constant (e.g. an INT32 bias); TensorRT accepts only INT8/FP8/INT4 "
                    "inputs, keep biases in float",
                )
            )
            break
    weight_dq = 0
    per_tensor = []
    for n in graph.node:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        w = producer.get(n.input[1])
        if w is None or w.op_type != "DequantizeLinear":
            continue
        weight_dq += 1
        scale = init.get(w.input[1])
        if scale is not None and int(np.prod(scale.dims)) <= 1 and n.op_type in ("Conv", "ConvTranspose"):
            per_tensor.append(n.name)
        axis = next((a.i for a in w.attribute if a.name == "axis"), 1)
        if scale is not None and int(np.prod(scale.dims)) > 1 and n.op_type == "Conv" and axis != 0:
            problems.append(
                Finding(
                    "warn", "qdq", f"{n.name}: per-channel weight scales on axis {axis}, not the output-channel axis 0"
                )
            )
        out = consumers.get(n.output[0], [])
        if any(c.op_type == "QuantizeLinear" for c in out):
            nxt = [
                cc.op_type
                for c in out
                if c.op_type == "QuantizeLinear"
                for d in consumers.get(c.output[0], [])
                for cc in consumers.get(d.output[0], [])
            ]
            if any(op in _ACTIVATIONS for op in nxt):
                problems.append(
                    Finding(
                        "warn",
                        "qdq",
                        f"{n.name}: its output is quantized before an activation; "
                        "TensorRT cannot fuse Conv+activation there",
                    )
                )
    if per_tensor:
        problems.append(
            Finding(
                "warn",
                "qdq",
                f"{len(per_tensor)} Conv(s) with per-tensor weight scales (e.g. "
                f"{per_tensor[0]}); per-channel keeps more accuracy",
            )
        )
    float_layers = sum(
        1 for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in init
    )
    problems.append(
        Finding(
            "info",
            "qdq",
            f"explicit quantization: {len(q_nodes)} Q / {len(dq_nodes)} DQ nodes; "
            f"{weight_dq} weighted layers in INT8, {float_layers} kept in float",
        )
    )
    for p in problems:
        add(p)
