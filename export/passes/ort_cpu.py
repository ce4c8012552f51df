"""Exact graph rewrites that keep a MobileFaceNet-style model on ONNX Runtime's fast CPU path.

ONNX Runtime's CPU provider runs convolutions fastest in its blocked channel layout (NCHWc), into which its optimizer
moves Conv, Add, Relu and per-channel Mul, but not PRelu or a grouped convolution whose groups hold more than one
channel. Every such node leaves the blocked layout (Reorder nodes around it) and runs a slower generic kernel. The
rewrites below replace them with operators that stay in the layout; each is exact up to float reassociation.

TensorRT has native PReLU and grouped-convolution layers, so edgekd writes artifacts as exported and applies these
rewrites when ONNX Runtime loads a model on the CPU (``OrtRuntime``), or bakes them into a file with
``edgekd export --ort-cpu-rewrites``. BENCHMARKS.md has what each one buys.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["decompose_prelu", "split_grouped_conv", "rewrite_for_ort_cpu"]

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def decompose_prelu(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite every ``PRelu(x, s)`` with a constant per-channel slope into ``s * x + Relu((1 - s) * x)``.

    The two forms are equal for slopes ``s <= 1`` (for a larger slope the node is left alone). ONNX Runtime's CPU
    ``PRelu`` goes through a generic broadcast loop, while the per-channel ``Mul`` nodes become blocked depthwise
    convolutions into which ``Relu`` and ``Add`` fuse; on MobileFaceNet this halves ORT CPU latency.

    Args:
        model: an ONNX model (not modified).

    Returns:
        The rewritten copy and the number of PReLU nodes rewritten.
    """
    out = _copy(model)
    graph = out.graph
    init = {t.name: t for t in graph.initializer}
    nodes, count = [], 0
    for node in graph.node:
        slope = init.get(node.input[1]) if node.op_type == "PRelu" and len(node.input) == 2 else None
        if slope is None or slope.data_type not in FLOAT_TYPES:
            nodes.append(node)
            continue
        s = numpy_helper.to_array(slope)
        if np.any(s > 1):
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        base = node.name or y
        rest = f"{base}/one_minus_slope"
        graph.initializer.append(numpy_helper.from_array((1 - s.astype(np.float64)).astype(s.dtype), rest))
        nodes += [
            helper.make_node("Mul", [x, node.input[1]], [f"{base}/neg"], name=f"{base}/neg_part"),
            helper.make_node("Mul", [x, rest], [f"{base}/scaled"], name=f"{base}/pos_scale"),
            helper.make_node("Relu", [f"{base}/scaled"], [f"{base}/pos"], name=f"{base}/pos_part"),
            helper.make_node("Add", [f"{base}/neg", f"{base}/pos"], [y], name=f"{base}/sum"),
        ]
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return out, count


def split_grouped_conv(model: onnx.ModelProto, max_group_width: int = 4) -> tuple[onnx.ModelProto, int]:
    """Rewrite a grouped ``Conv`` with k input and k output channels per group (1 < k <= max_group_width) into k
    depthwise convolutions summed.

    Output channel ``o`` of group ``g`` (``o = g*k + j``) is ``sum_i W[o, i] * x[g*k + i]``. Term ``r`` of the split
    takes, for every ``o``, the input channel ``g*k + (j + r) mod k``: a depthwise convolution of the input with its
    channels permuted (a ``Gather``; term 0 needs none) by the weights ``W[o, (j + r) mod k]``. ONNX Runtime runs
    depthwise convolutions in its blocked layout and fuses the sums into them, whereas a grouped convolution of narrow
    groups goes through one small im2col GEMM per group: arcface_torch's MobileFaceNet has one (64 groups of 2 channels
    on 56x56) that took as long as eight pointwise convolutions. Wider groups are left alone (the split costs k
    passes over the input), as are convolutions whose weights are not a constant (e.g. a DequantizeLinear output).

    Args:
        model: an ONNX model (not modified).
        max_group_width: the widest group split.

    Returns:
        The rewritten copy and the number of Conv nodes split.
    """
    out = _copy(model)
    graph = out.graph
    init = {t.name: t for t in graph.initializer}
    nodes, replaced = [], []
    for node in graph.node:
        weight = init.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        group = attrs.get("group", 1)
        w = numpy_helper.to_array(weight) if weight is not None and weight.data_type in FLOAT_TYPES else None
        if w is None or group == 1 or not 1 < w.shape[1] <= max_group_width or w.shape[0] != group * w.shape[1]:
            nodes.append(node)
            continue
        channels, k = w.shape[0], w.shape[1]
        base = node.name or node.output[0]
        j = np.arange(channels) % k
        terms = []
        for r in range(k):
            source = node.input[0]
            if r:
                perm = (np.arange(channels) // k) * k + (j + r) % k
                graph.initializer.append(numpy_helper.from_array(perm.astype(np.int64), f"{base}/perm{r}"))
                source = f"{base}/x_perm{r}"
                nodes.append(
                    helper.make_node(
                        "Gather", [node.input[0], f"{base}/perm{r}"], [source], name=f"{base}/permute{r}", axis=1
                    )
                )
            dw = w[np.arange(channels), (j + r) % k][:, None]
            graph.initializer.append(numpy_helper.from_array(dw, f"{base}/dw{r}_weight"))
            bias = node.input[2:3] if r == 0 else []  # the bias once
            term = f"{base}/term{r}"
            nodes.append(
                helper.make_node(
                    "Conv",
                    [source, f"{base}/dw{r}_weight", *bias],
                    [term],
                    name=f"{base}/dw{r}",
                    **{**attrs, "group": channels},
                )
            )
            terms.append(term)
        total = terms[0]
        for r in range(1, k):
            result = node.output[0] if r == k - 1 else f"{base}/partial{r}"
            nodes.append(helper.make_node("Add", [total, terms[r]], [result], name=f"{base}/sum{r}"))
            total = result
        replaced.append(node.input[1])
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in graph.node for name in n.input} | {v.name for v in graph.input}
    orphans = set(replaced) - used  # the split convolutions' grouped weights
    kept = [t for t in graph.initializer if t.name not in orphans]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return out, len(replaced)


def rewrite_for_ort_cpu(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Apply every rewrite above; returns the copy and how many nodes each one rewrote."""
    model, prelu = decompose_prelu(model)
    model, grouped = split_grouped_conv(model)
    return model, {"prelu": prelu, "grouped_conv": grouped}
