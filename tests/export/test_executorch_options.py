"""``--target executorch`` without lowering anything: the options it refuses, the default file name, the one-line error
without the extra, and the delegation check's rule. None of these needs ExecuTorch installed."""

from __future__ import annotations

import sys

import pytest
import torch

from edgekd.errors import EdgekdError, GateFailed, MissingDependency
from edgekd.export.builders.executorch import DelegationCensus, check_delegation, delegation_census
from edgekd.export.options import ExportOptions, check_options
from edgekd.export.passes.int8 import Int8Options
from edgekd.export.pipeline import default_output


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"precision": "fp16"}, "fp32 or int8 programs, not fp16"),
        ({"static_batch": 4}, "--static-batch 4"),
        ({"opset": 17}, "--opset"),
        ({"legacy_exporter": True}, "--legacy-exporter"),
        ({"ort_cpu_rewrites": True}, "--ort-cpu-rewrites"),
        ({"precision": "int8", "calib": "builtin", "calib_method": "minmax"}, "--calib-method"),
        ({"precision": "int8", "calib": "builtin", "calib_cache": "/tmp/c"}, "--calib-cache"),
        ({"precision": "int8", "calib": "builtin", "int8": Int8Options(keep_first=0)}, "--keep-first"),
        ({"trt": True}, "--trt"),
    ],
)
def test_executorch_refuses_what_it_cannot_honour(options, fragment):
    with pytest.raises(EdgekdError, match="executorch") as info:
        check_options(ExportOptions(target="executorch", **options))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_executorch_accepts_its_own_options():
    check_options(ExportOptions(target="executorch"))
    check_options(ExportOptions(target="executorch", static_batch=1))  # what every program is anyway
    check_options(ExportOptions(target="executorch", precision="int8", calib="builtin", calib_images=16))
    with pytest.raises(EdgekdError, match="unknown target 'tflite'"):
        check_options(ExportOptions(target="tflite"))


def test_the_command_line_refuses_in_one_line(tmp_path, make_checkpoint, run_cli):
    ckpt = make_checkpoint(tmp_path / "m.safetensors", "mbf_tiny", input_size=32)
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    for argv, fragment in (
        (["export", str(ckpt), "--target", "executorch", "--precision", "fp16"], "not fp16"),
        (["export", str(ckpt), "--target", "executorch", "--opset", "17"], "--opset applies to --target onnx only"),
        (["export", str(ckpt), "--target", "executorch", "--out", str(tmp_path / "m.onnx")], "must end in .pte"),
        (["export", str(tmp_path / "m.onnx"), "--target", "executorch"], "m.onnx is an ONNX file"),
    ):
        code, _, err = run_cli(argv)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("edgekd: error:"), err
        assert fragment in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.safetensors"]


def test_default_output_of_a_program(tmp_path):
    assert default_output(tmp_path / "s.safetensors", "int8", target="executorch").name == "s.int8.pte"
    assert default_output(tmp_path / "s.safetensors", "int8").name == "s.int8.onnx"


@pytest.fixture
def without_executorch(monkeypatch):
    """This process as it is without the executorch extra: every ``executorch`` module unimportable (a None entry in
    ``sys.modules`` makes ``import`` raise ``ModuleNotFoundError``, as for a package that is not there)."""
    for name in [n for n in sys.modules if n == "executorch" or n.startswith("executorch.")] + ["executorch"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_without_the_extra_each_entry_point_says_what_to_install(
    without_executorch, tmp_path, make_checkpoint, run_cli
):
    ckpt = make_checkpoint(tmp_path / "m.safetensors", "mbf_tiny", input_size=32)
    (tmp_path / "m.pte").write_bytes(b"\x00" * 64)
    out = tmp_path / "out"
    for argv in (
        ["export", str(ckpt), "--target", "executorch", "--out", str(out / "m.pte")],
        ["eval", str(tmp_path / "m.pte"), "--out", str(out)],
        ["benchmark-latency", str(tmp_path / "m.pte"), "--json", str(out / "l.json")],
    ):
        code, _, err = run_cli(argv)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith("edgekd: error: executorch is not installed") and "edgekd[executorch]" in lines[0]
    assert not out.exists(), "nothing is written before the dependency check"

    from edgekd.export.runtimes import open_runtime

    with pytest.raises(MissingDependency, match=r"edgekd\[executorch\]"):
        open_runtime(tmp_path / "m.pte")


def test_delegation_check_refuses_a_program_xnnpack_does_not_run():
    """A program that was never partitioned (plain ``torch.export``) has no XNNPACK subgraph: refused; the rule also
    refuses a convolution or matrix multiply left outside and accepts glue left outside."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.PReLU(4), torch.nn.Flatten(), torch.nn.Linear(64, 8))
    exported = torch.export.export(model.eval(), (torch.zeros(1, 3, 6, 6),))
    census = delegation_census(exported.graph_module)
    assert census.subgraphs == 0 and not census.delegated
    assert census.outside_compute.keys() == {"aten.conv2d", "aten.linear"}
    with pytest.raises(GateFailed, match="XNNPACK runs none of its operators"):
        check_delegation(census, "m.pte")

    inside = {"aten.convolution": 1, "aten.prelu": 1}
    with pytest.raises(GateFailed, match=r"aten\.linear x1 left to ExecuTorch's portable kernels"):
        check_delegation(DelegationCensus(1, inside, {"aten.linear": 1, "aten.view_copy": 1}), "m.pte")
    check_delegation(DelegationCensus(1, inside, {"aten.view_copy": 1}), "m.pte")
