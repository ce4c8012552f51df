"""FP32 ONNX -> FP16-typed ONNX with FP32 input and output.

The conversion starts from the exported FP32 graph, so BatchNorm is already folded in FP32 (folding after ``.half()``
would round the folded weights twice). Every float32 initializer, ``Constant`` and ``Cast``-to-float becomes float16;
one ``Cast`` after the input and one before the output keep the interface float32. TensorRT 11 (strongly typed) builds
an FP16 engine from this graph as is; ONNX Runtime runs it on any provider.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekd.errors import EdgekdError

__all__ = ["convert_fp16", "FP32_ONLY_INPUTS"]

# (op_type, input index) that the ONNX spec requires to stay float32 whatever the data type is.
FP32_ONLY_INPUTS = {("Resize", 2), ("Upsample", 1)}


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """An FP16-typed copy of ``model`` whose graph inputs and outputs stay float32.

    Args:
        model: a float32 ONNX model (not modified).

    Returns:
        The converted model, checked with ``onnx.checker`` (full check).

    Raises:
        EdgekdError: the model is not float32 or the converted graph does not check.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for value in [*graph.input, *graph.output]:
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise EdgekdError(f"FP16 conversion needs float32 inputs and outputs; {value.name!r} is not float32")

    keep_fp32 = {
        node.input[i]
        for node in graph.node
        for op, i in FP32_ONLY_INPUTS
        if node.op_type == op and len(node.input) > i and node.input[i]
    }
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT and tensor.name not in keep_fp32:
            graph.initializer[i].CopyFrom(_to_fp16(tensor))
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] not in keep_fp32:
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    attr.t.CopyFrom(_to_fp16(attr.t))
                elif attr.name in ("value_float", "value_floats"):
                    raise EdgekdError("FP16 conversion does not handle Constant value_float(s); re-export the model")
        elif node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16
        elif node.op_type in ("ConstantOfShape",):
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    attr.t.CopyFrom(_to_fp16(attr.t))

    # FP32 interface: cast the input down once and the output up once.
    casts_in, casts_out = [], []
    for value in graph.input:
        half = f"{value.name}_fp16"
        for node in graph.node:
            for j, name in enumerate(node.input):
                if name == value.name:
                    node.input[j] = half
        casts_in.append(helper.make_node("Cast", [value.name], [half], to=TensorProto.FLOAT16, name=f"{half}_cast"))
    for value in graph.output:
        half = f"{value.name}_fp16"
        for node in graph.node:
            for j, name in enumerate(node.output):
                if name == value.name:
                    node.output[j] = half
        casts_out.append(helper.make_node("Cast", [half], [value.name], to=TensorProto.FLOAT, name=f"{half}_cast"))
    nodes = [*casts_in, *graph.node, *casts_out]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # stale float32 types; shape inference refills them
    try:
        out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
        onnx.checker.check_model(out, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise EdgekdError(f"the FP16 graph is invalid: {str(exc).strip().splitlines()[0][:300]}") from exc
    return out


def _to_fp16(tensor: onnx.TensorProto) -> onnx.TensorProto:
    array = numpy_helper.to_array(tensor)
    return numpy_helper.from_array(array.astype("float16"), tensor.name)
