"""The TensorRT-readiness check: flags unsupported operators, bad Q/DQ, shapes and opsets; passes clean exports."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekd.export.checks.readiness import check_readiness


def _model(nodes, inits=(), opset=20, batch="batch", extra_domains=()):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, 4])],
        list(inits),
    )  # fmt: skip
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in extra_domains)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def test_flags_unsupported_operator():
    nodes = [
        helper.make_node("Relu", ["input"], ["r"]),
        helper.make_node("Unique", ["r"], ["u"], sorted=1),
        helper.make_node("Identity", ["r"], ["embedding"]),
    ]
    report = check_readiness(_model(nodes), name="bad.onnx")
    assert not report.ready
    assert any(f.level == "error" and f.check == "operators" and "Unique" in f.message for f in report.findings)
    assert "NOT ready" in report.format() and "Unique" in report.format()


def test_flags_custom_domain_opset_and_fixed_batch():
    nodes = [helper.make_node("FusedGemm", ["input", "input"], ["embedding"], domain="com.microsoft")]
    report = check_readiness(_model(nodes, opset=22, batch=4, extra_domains=("com.microsoft",)))
    levels = {(f.level, f.check) for f in report.findings}
    assert ("error", "operators") in levels  # a contrib op TensorRT does not know
    assert ("warn", "opset") in levels  # opset 22 needs a newer parser than TensorRT 10.0
    assert any(f.check == "shapes" and "fixed batch" in f.message for f in report.findings)


def test_flags_trt_unfriendly_qdq():
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s")
    zp_u8 = numpy_helper.from_array(np.array(128, dtype=np.uint8), "zp")
    bias_i32 = numpy_helper.from_array(np.array([1, 2, 3, 4], dtype=np.int32), "b_q")
    zp_i32 = numpy_helper.from_array(np.array(0, dtype=np.int32), "b_zp")
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s", "zp"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], name="dq"),
        helper.make_node("DequantizeLinear", ["b_q", "s", "b_zp"], ["b"], name="bias_dq"),
        helper.make_node("Add", ["dq", "b"], ["embedding"]),
    ]
    report = check_readiness(_model(nodes, [scale, zp_u8, bias_i32, zp_i32]))
    messages = " | ".join(f.message for f in report.errors())
    assert "non-zero zero-point" in messages and "INT32" in messages and "uint8" in messages


def test_clean_export_is_ready(tmp_path, capsys):
    from edgekd.cli import main
    from edgekd.export.passes.onnx import export_onnx, model_metadata, save_onnx
    from edgekd.models import create_model

    model = create_model("mbf_tiny", input_size=32).eval()
    path = save_onnx(export_onnx(model, model.cfg, metadata=model_metadata(model.cfg)), tmp_path / "m.onnx")
    report = check_readiness(path)
    assert report.ready and not [f for f in report.findings if f.level == "warn"], report.format()
    main(["export", str(path)])  # an .onnx argument prints the readiness report only
    assert "TensorRT readiness of m.onnx: ready" in capsys.readouterr().out

    bad = onnx.load(str(path))
    bad.graph.node.append(helper.make_node("Unique", [bad.graph.output[0].name], ["u"]))
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "bad.onnx")])
    assert exit_info.value.code == 2
    assert "not TensorRT-ready" in capsys.readouterr().err
