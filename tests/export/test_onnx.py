"""FP32 ONNX export: one file with a dynamic batch axis, BatchNorm folded, metadata, gates, batch invariance."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from edgekd.bundle import load_bundle
from edgekd.export.options import ExportOptions
from edgekd.export.passes.onnx import INPUT_NAME, OUTPUT_NAME, read_metadata
from edgekd.export.pipeline import export_checkpoint
from edgekd.export.runtimes import OrtRuntime


@pytest.mark.parametrize(("name", "size"), [pytest.param("mbf", 112, marks=pytest.mark.slow), ("r_tiny", 32)])
def test_export_fp32_batches_from_one_file(tmp_path, make_checkpoint, name, size, network_atol):
    ckpt = make_checkpoint(tmp_path / f"{name}.safetensors", name, input_size=size)
    out = tmp_path / f"{name}.onnx"
    result = export_checkpoint(ckpt, out, ExportOptions(gate_batches=(1, 3, 32), gate_images=16))

    assert result.onnx == out and out.is_file() and result.gate.passed
    assert not list(tmp_path.glob(".*tmp")), "temporary files left behind"
    assert {r.batch for r in result.gate.rows} == {1, 3, 32}
    assert min(r.min_cos for r in result.gate.rows) >= 0.99999
    assert {r.source for r in result.gate.rows} == {"synthetic", "noise"}

    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert not list(tmp_path.glob("*.data")), "weights must be inside the one file"
    for value, dim in ((model.graph.input[0], INPUT_NAME), (model.graph.output[0], OUTPUT_NAME)):
        assert value.name == dim
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    ops = Counter(n.op_type for n in model.graph.node)
    if name == "mbf":
        assert ops["BatchNormalization"] == 0
    else:  # iResNet: only the pre-activation BNs in front of zero-padded convs remain; bn2 is folded into the fc
        assert ops["BatchNormalization"] == 4
        producers = {o: n.op_type for n in model.graph.node for o in n.output}
        reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
        assert producers[reshape.input[0]] != "BatchNormalization"

    meta = read_metadata(model)
    assert meta["input_size"] == [3, size, size] and meta["embed_dim"] in (128, 512)
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.5, 0.5, 0.5] and meta["channel_order"] == "RGB"
    assert meta["precision"] == "fp32" and meta["edgekd_version"] and len(meta["source_sha256"]) == 16
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["gate"]["passed"] and sidecar["environment"]["versions"]["onnxruntime"]

    # each sample's embedding is the same whether it runs alone or inside a batch of 3 or 32
    runtime = OrtRuntime(out)
    x = torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(1))
    alone = np.concatenate([runtime(x[i : i + 1]).numpy() for i in range(32)])
    in_threes = np.concatenate([runtime(x[i : i + 3]).numpy() for i in range(0, 32, 3)])
    in_32 = runtime(x).numpy()
    # Batch sizes may take other kernels, which sum in other orders: network_atol (tests/conftest.py), counted on the
    # checkpoint's network (measured: 0 on an AMD EPYC, whose ONNX Runtime kernels do not depend on the batch).
    atol = network_atol(load_bundle(ckpt).backbone, alone)
    np.testing.assert_allclose(in_threes, alone, rtol=0, atol=atol)
    np.testing.assert_allclose(in_32, alone, rtol=0, atol=atol)


def test_fold_batchnorm_into_gemm_is_exact():
    """BN -> flatten -> Gemm folds into the Gemm with the outputs unchanged."""
    from edgekd.export.passes.onnx import fold_batchnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
        torch.nn.PReLU(4),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 5),
    )
    with torch.no_grad():
        bn = net[2]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    program = torch.onnx.export(net, (x,), dynamo=True, optimize=False, verbose=False)
    model = program.model_proto
    before = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    import onnxruntime as ort

    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = ref.get_inputs()[0].name
    expected = ref.run(None, {name: x.numpy()})[0]
    model, folded = fold_batchnorm(model)
    assert before == 1 and folded == 1
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {name: x.numpy()}
    )[0]
    # Both graphs are float32 (u = 2⁻²⁴). The BatchNorm rounds h·γ/σ + shift (a few u of |h·γ/σ| + |shift|), folding
    # rounds each new weight once and the new bias (a 257-term sum), and each Gemm sums 256 products plus the bias:
    # to first order |got − expected| ≤ 2·(257 + 8)·u·Σ|terms|, Σ|terms| = |W|·(|h·γ/σ| + |shift|) + |b| over the
    # Gemm's inputs h (the PRelu's output), in float64 (measured: 0.9u·Σ|terms|).
    with torch.no_grad():
        h = net[:2](x).double().flatten(1)
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double()
        shift = bn.bias.double() - bn.running_mean.double() * scale
        w_abs, per_pixel = net[4].weight.double().abs(), h.shape[1] // len(scale)
        terms = (h * scale.repeat_interleave(per_pixel)).abs() @ w_abs.T
        terms += shift.repeat_interleave(per_pixel).abs() @ w_abs.T + net[4].bias.double().abs()
    assert np.all(np.abs(got - expected) <= 2 * (257 + 8) * 2.0**-24 * terms.numpy())
