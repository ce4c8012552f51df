"""ONNX Runtime CPU rewrites: each is exact against float64 PyTorch math, leaves what it cannot rewrite alone, and is
applied by edgekd's ORT runtime at load (and not when a gate asks for the graph as written)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgekd.export.passes.onnx import export_onnx
from edgekd.export.passes.ort_cpu import decompose_prelu, rewrite_for_ort_cpu, split_grouped_conv
from edgekd.export.runtimes import OrtRuntime
from edgekd.models import create_model


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_decompose_prelu_is_exact_and_skips_large_slopes(network_atol):
    torch.manual_seed(0)
    model = create_model("mbf_tiny", input_size=32).eval()
    prelus = [m for m in model.modules() if isinstance(m, torch.nn.PReLU)]
    with torch.no_grad():
        for m in prelus:
            m.weight.uniform_(-0.5, 1.0)
        prelus[0].weight[0] = 1.5  # a slope > 1: that node must be left as PRelu
    proto = export_onnx(model, model.cfg)
    rewritten, count = decompose_prelu(proto)
    ops = Counter(n.op_type for n in rewritten.graph.node)
    assert count == len(prelus) - 1 and ops["PRelu"] == 1
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model.double()(x.double()).numpy()
    # Relu(x) − a·Relu(−x) rounds as PRelu does (once, a·x), so the graphs differ only where ONNX Runtime fuses other
    # nodes: float32 rounding, as against float64, which network_atol bounds (tests/conftest.py; measured 8 ulps of
    # the largest entry). The embeddings of this BatchNorm-fresh net are ~1e-3: a fixed 1e-4 would say nothing.
    got = run_ort(rewritten, x.numpy())
    np.testing.assert_allclose(got, expected, rtol=0, atol=network_atol(model, expected))
    np.testing.assert_allclose(got, run_ort(proto, x.numpy()), rtol=0, atol=network_atol(model, expected))


def conv_graph(weight: np.ndarray, bias: np.ndarray, group: int, **attrs) -> onnx.ModelProto:
    """One Conv node with constant weights, dynamic batch."""
    c_in = weight.shape[1] * group
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=group, **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", c_in, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weight.shape[0], None, None])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_split_grouped_conv_matches_float64_conv(k, stride):
    rng = np.random.default_rng(k * 10 + stride)
    groups = 4
    w = rng.standard_normal((groups * k, k, 3, 3)).astype(np.float32)
    b = rng.standard_normal(groups * k).astype(np.float32)
    model = conv_graph(w, b, groups, pads=[1, 1, 1, 1], strides=[stride, stride])
    split, count = split_grouped_conv(model)
    ops = Counter(n.op_type for n in split.graph.node)
    assert count == 1 and ops == {"Conv": k, "Gather": k - 1, "Add": k - 1}
    assert all(
        helper.get_attribute_value(a) == groups * k
        for n in split.graph.node
        for a in n.attribute
        if n.op_type == "Conv" and a.name == "group"
    )
    assert "w" not in {t.name for t in split.graph.initializer}, "the grouped weights are dropped"
    onnx.checker.check_model(split, full_check=True)

    x = rng.standard_normal((3, groups * k, 9, 9)).astype(np.float32)
    expected = torch.nn.functional.conv2d(
        torch.from_numpy(x).double(),
        torch.from_numpy(w).double(),
        torch.from_numpy(b).double(),
        stride=stride,
        padding=1,
        groups=groups,
    ).numpy()
    # float32 (u = 2⁻²⁴) against float64: each output of a group is a sum of K = 9k products and the bias, and the
    # split adds its k partial convolutions with k − 1 Adds; γ_n ≈ n·u bounds the rounding of n such additions, so
    # |error| ≤ (9k + k)·u·(|w| ⋆ |x| + |b|), the same convolution on absolute values (measured: ≤ 2.5u of that).
    bound = torch.nn.functional.conv2d(
        torch.from_numpy(np.abs(x)).double(),
        torch.from_numpy(np.abs(w)).double(),
        torch.from_numpy(np.abs(b)).double(),
        stride=stride,
        padding=1,
        groups=groups,
    ).numpy()
    assert np.all(np.abs(run_ort(split, x) - expected) <= 10 * k * 2.0**-24 * bound)


@pytest.mark.parametrize(
    ("shape", "group", "why"),
    [
        ((8, 1, 3, 3), 8, "depthwise already"),
        ((8, 8, 3, 3), 1, "dense"),
        ((16, 8, 3, 3), 2, "groups too wide"),
        ((8, 2, 3, 3), 2, "more outputs than inputs per group"),
    ],
)
def test_split_grouped_conv_leaves_other_convs_alone(shape, group, why):
    w = np.ones(shape, np.float32)
    model = conv_graph(w, np.zeros(shape[0], np.float32), group, pads=[1, 1, 1, 1])
    split, count = split_grouped_conv(model)
    assert count == 0, why
    assert [n.op_type for n in split.graph.node] == ["Conv"]


@pytest.mark.slow  # a 112x112 MobileFaceNet export (~8 s)
def test_ort_runtime_rewrites_mobilefacenet_at_load_only_when_asked(network_atol):
    torch.manual_seed(0)
    model = create_model("mbf", input_size=112).eval()  # arcface_torch's mbf: one Conv of 64 groups x 2 channels
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.0, 0.5)
    proto = export_onnx(model, model.cfg)
    rewritten, counts = rewrite_for_ort_cpu(proto)
    prelus = sum(isinstance(m, torch.nn.PReLU) for m in model.modules())
    assert counts == {"prelu": prelus, "grouped_conv": 1}

    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = model.double()(x.double()).numpy()
    runtime = OrtRuntime(proto.SerializeToString(), threads=1)
    assert runtime.rewrites == counts
    got = runtime(x).numpy()
    cos = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() > 0.999999  # 1 − cos = ½‖e‖² for a relative error e: allows 1.4e-3, float32 gives ~1e-6
    # The rewrites are exact, so the rewritten float32 graph is off float64 by rounding alone (network_atol).
    np.testing.assert_allclose(got, expected, rtol=0, atol=network_atol(model, expected))
    assert OrtRuntime(proto.SerializeToString(), cpu_rewrites=False).rewrites == {}


@pytest.mark.slow  # export plus gates of a MobileFaceNet (~8 s)
def test_export_can_bake_the_rewrites_and_gates_the_file_as_written(tmp_path, make_checkpoint):
    from edgekd.export.options import ExportOptions
    from edgekd.export.pipeline import export_checkpoint

    ckpt = make_checkpoint(tmp_path / "mbf.safetensors", "mbf", input_size=112)
    out = tmp_path / "mbf.onnx"
    result = export_checkpoint(ckpt, out, ExportOptions(gate_batches=(1, 3), gate_images=8, ort_cpu_rewrites=True))
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert result.gate.passed and ops["PRelu"] == 0 and ops["Gather"] == 1
    assert OrtRuntime(out).rewrites == {"prelu": 0, "grouped_conv": 0}  # nothing left to rewrite at load
