"""TensorRT: the real build / inspect / gate paths run only where TensorRT and an NVIDIA GPU exist (no stand-in module).

Everywhere else: the one-line message without TensorRT, and the layer-precision census read from engine-inspector
JSON documents (plain data, the format TensorRT writes).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from edgekd.errors import GateFailed
from edgekd.export.builders.tensorrt import census_from_layer_info, check_layer_precisions
from edgekd.export.options import PRECISIONS

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
HAVE_TORCH_TRT = importlib.util.find_spec("torch_tensorrt") is not None
needs_trt = pytest.mark.skipif(
    not (HAVE_TRT and torch.cuda.is_available()), reason="needs TensorRT (pip install 'edgekd[trt]') and an NVIDIA GPU"
)
needs_torch_trt = pytest.mark.skipif(
    not (HAVE_TORCH_TRT and torch.cuda.is_available()),
    reason="needs torch-tensorrt (pip install 'edgekd[trt]') and an NVIDIA GPU",
)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_trt_without_tensorrt_is_one_line(tmp_path, make_checkpoint, capsys):
    from edgekd.cli import main

    ckpt = make_checkpoint(tmp_path / "m.safetensors", "mbf_tiny", input_size=32)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(ckpt), "--trt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "TensorRT" in err and "edgekd[trt]" in err and "NVIDIA GPU" in err
    assert not list(tmp_path.glob("*.onnx")), "the TensorRT check runs before any work"


def _layer(kind, dtype, name="node_Conv_1", weights=None):
    layer = {
        "Name": name,
        "LayerType": kind,
        "Inputs": [{"Name": "x", "Format/Datatype": dtype}],
        "Outputs": [{"Name": "y", "Format/Datatype": dtype}],
    }
    if weights:
        layer["Weights"] = {"Type": weights, "Count": 9}
    return layer


def test_layer_census_and_precision_check():
    fp16 = {
        "Layers": [
            _layer("CaskConvolution", "Channel major FP16 format where channel % 8 == 0"),
            _layer("CaskConvolution", "Half"),
            _layer("Reformat", "Row major linear FP32", "reformat"),
            _layer("PointWiseV2", "Half", "node_PRelu_3"),
        ]
    }
    census = census_from_layer_info(fp16)
    assert census["compute_layers"] == {"fp16": 2} and census["detailed"]
    check_layer_precisions(census, "fp16")
    with pytest.raises(GateFailed, match="FP32 engine"):
        check_layer_precisions(census, "fp32")

    silently_fp32 = census_from_layer_info({"Layers": [_layer("CaskConvolution", "Float")] * 3})
    with pytest.raises(GateFailed, match="FP16"):
        check_layer_precisions(silently_fp32, "fp16")

    int8 = census_from_layer_info(
        {"Layers": [_layer("CaskConvolution", "Int8 NC/32", weights="Int8")] * 4 + [_layer("CaskConvolution", "Float")]}
    )
    check_layer_precisions(int8, "int8", expected_int8_layers=4)
    with pytest.raises(GateFailed, match="INT8"):
        check_layer_precisions(int8, "int8", expected_int8_layers=10)
    with pytest.raises(GateFailed, match="no per-layer types"):
        check_layer_precisions(census_from_layer_info({"Layers": ["conv1", "conv2"]}), "fp16")


@needs_trt
@pytest.mark.trt
@pytest.mark.parametrize("precision", PRECISIONS)
def test_trt_engine_passes_gates(tmp_path, trained_student, student_gate_options, precision):
    import json

    from edgekd.export.builders.tensorrt import EngineProfile
    from edgekd.export.options import ExportOptions
    from edgekd.export.pipeline import export_checkpoint

    options = ExportOptions(
        precision=precision,
        calib="builtin" if precision == "int8" else None,
        trt=True,
        profile=EngineProfile(1, 8, 32),
        timing_cache=str(tmp_path / "timing.cache"),
        **student_gate_options,
    )
    result = export_checkpoint(trained_student, tmp_path / f"s.{precision}.onnx", options)
    assert result.engine is not None and result.engine.is_file() and result.engine_gate.passed
    meta = json.loads(result.engine.with_name(result.engine.name + ".json").read_text())
    assert meta["trt_version"] and meta["gpu"]["name"] and meta["profile"]["max_batch"] == 32
    assert meta["layers"]["detailed"] and (tmp_path / "timing.cache").is_file()
    if precision != "fp32":
        assert meta["layers"]["compute_layers"].get(precision, 0) > 0


@needs_torch_trt
@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torch_tensorrt_route_passes_gates(tmp_path, trained_student, student_gate_options, precision):
    from edgekd.export.options import ExportOptions
    from edgekd.export.pipeline import export_checkpoint

    options = ExportOptions(precision=precision, trt=True, trt_via="torch-tensorrt", **student_gate_options)
    result = export_checkpoint(trained_student, tmp_path / f"s.{precision}.onnx", options)
    assert result.engine is not None and result.engine.is_file() and result.engine_gate.passed


@needs_trt
@pytest.mark.trt
def test_trt_latency_backend(tmp_path, trained_student):
    from edgekd.export.latency import LatencyConfig, ModelSpec, run_benchmark
    from edgekd.export.options import ExportOptions
    from edgekd.export.pipeline import export_checkpoint

    result = export_checkpoint(trained_student, tmp_path / "s.onnx", ExportOptions(trt=True, gate_images=16))
    spec = ModelSpec(path=str(result.engine), name="s.plan", input_size=(3, 32, 32))
    rows = run_benchmark([spec], ["tensorrt"], LatencyConfig(batches=(1, 8), device="cuda", iters=20, min_seconds=0.1))
    assert all(r["status"] == "ok" and r["device_ms"] and r["e2e_ms"] for r in rows)
