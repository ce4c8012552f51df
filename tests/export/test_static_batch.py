"""``edgekd export --static-batch N`` (fixed-shape runtimes: NNAPI, CoreML) and the insightface loading warning."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def test_static_batch_export_is_fixed_gated_and_runs_any_count(tmp_path, make_checkpoint, run_cli, network_atol):
    from edgekd.export.passes.onnx import read_metadata
    from edgekd.export.runtimes import OrtRuntime

    ckpt = make_checkpoint(tmp_path / "m.safetensors", "mbf_tiny", input_size=32)
    out = tmp_path / "deploy" / "m.onnx"
    code, stdout, err = run_cli(["export", str(ckpt), "--static-batch", "2", "--gate-images", "8", "--out", str(out)])
    assert code == 0, err

    model = onnx.load(str(out))
    assert _dims(model.graph.input[0]) == [2, 3, 32, 32] and _dims(model.graph.output[0]) == [2, 128]
    assert read_metadata(model)["static_batch"] == 2
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["static_batch"] == 2 and sidecar["gate"]["passed"]
    assert {row["batch"] for row in sidecar["gate"]["rows"]} == {1, 2}  # the gate runs the graph's own batch
    warnings = [line for line in stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "model_zoo.get_model" in warnings[0]
    assert "32x32" in warnings[0] and "batch is fixed at 2" in warnings[0]

    # edgekd's runtime feeds a fixed-batch graph in chunks of its batch, padding the last one
    runtime = OrtRuntime(out)
    assert runtime.contract.batch == 2
    from edgekd.bundle import load_bundle

    backbone = load_bundle(ckpt).backbone.eval()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = backbone(x).numpy()
    # ONNX Runtime's float32 kernels (BatchNorm folded) against PyTorch's: network_atol (tests/conftest.py)
    np.testing.assert_allclose(runtime(x).numpy(), expected, rtol=0, atol=network_atol(backbone, expected))


def test_default_output_names_the_static_batch(tmp_path):
    from edgekd.export.pipeline import default_output

    assert default_output(tmp_path / "s.safetensors", "fp16").name == "s.fp16.onnx"
    assert default_output(tmp_path / "s.safetensors", "fp16", 4).name == "s.fp16.b4.onnx"


@pytest.mark.parametrize(
    ("size", "batch", "mean", "expected"),
    [
        ((3, 112, 112), None, 0.5, []),
        ((3, 112, 112), 1, 0.5, []),
        ((3, 32, 32), None, 0.5, ["112x112 and larger multiples of 16"]),
        ((3, 128, 128), None, 0.5, ["older insightface releases route only 112x112"]),
        ((3, 96, 96), None, 0.5, ["Attribute"]),
        ((1, 112, 112), None, 0.5, ["1 channel(s)"]),
        ((3, 112, 112), 8, 0.5, ["batch is fixed at 8"]),
        ((3, 112, 112), None, 0.45, ["(x - 127.5) / 127.5"]),
        ((3, 112, 96), None, 0.5, ["square"]),
    ],
)
def test_insightface_routing_rule(size, batch, mean, expected):
    from edgekd.export.checks.insightface import insightface_problems

    problems = insightface_problems(size, mean=(mean,) * size[0], std=(0.5,) * size[0], batch=batch)
    assert len(problems) == len(expected), problems
    for problem, fragment in zip(problems, expected, strict=True):
        assert fragment in problem
