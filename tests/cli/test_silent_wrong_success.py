"""Issue 23, class 2: a command either does what was asked or refuses in one line; it never exits 0 having done
something else. ONNX graphs that are not one-image-in, one-embedding-out are refused by eval and
benchmark-latency (the first output used to be scored as if it were the embedding); an opset the exporter cannot
write is refused (it wrote opset 18 and a sidecar naming the asked one); benchmark-latency with nothing it can time
here is refused (it wrote an empty report). Images and one-class data: tests/data/test_image_modes.py."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

PAIRS = "synthetic:identities=6,images_per_identity=3,image_size=16,pairs=20,pair_identities=6"


def _graph(outputs: int = 1, inputs: int = 1, out_rank: int = 2) -> onnx.ModelProto:
    """A small float graph on (batch, 3, 16, 16) images: flatten, a fixed projection to 8 dims (``outputs`` copies),
    an extra input added in where ``inputs`` is 2, an output reshaped to ``out_rank`` dims."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((768, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["z"])]
    graph_inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])]
    if inputs == 2:
        graph_inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["batch", 8]))
        nodes.append(helper.make_node("Add", ["z", "bias"], ["z2"]))
        last = "z2"
    else:
        last = "z"
    outs = []
    for k in range(outputs):
        name = "embedding" if k == 0 else f"extra{k}"
        if out_rank == 2:
            nodes.append(helper.make_node("Identity", [last], [name]))
            outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 8]))
        else:
            nodes.append(helper.make_node("Reshape", [last, "shape4"], [name]))
            outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 2, 2, 2]))
    inits = [w] + ([numpy_helper.from_array(np.array([0, 2, 2, 2], dtype=np.int64), "shape4")] if out_rank != 2 else [])
    model = helper.make_model(
        helper.make_graph(nodes, "g", graph_inputs, outs, inits), opset_imports=[helper.make_opsetid("", 18)]
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


GRAPHS = {
    "two outputs": (dict(outputs=2), "2 outputs (embedding, extra1)"),
    "three outputs": (dict(outputs=3), "3 outputs"),
    "two inputs": (dict(inputs=2), "2 inputs (input, bias)"),
    "a 4-D output": (dict(out_rank=4), "has 4 dimensions"),
}


@pytest.mark.parametrize("name", GRAPHS)
@pytest.mark.parametrize("command", ["eval", "benchmark-latency"])
def test_a_graph_that_is_not_one_image_to_one_embedding_is_refused(name, command, tmp_path, run_cli, one_line):
    kwargs, fragment = GRAPHS[name]
    path = tmp_path / "model.onnx"
    onnx.save(_graph(**kwargs), path)
    argv = ["eval", str(path), "--pairs", PAIRS, "--out", str(tmp_path / "eval")] if command == "eval" else [
        "benchmark-latency", str(path), "--backend", "ort-cpu", "--json", str(tmp_path / "lat.json")]  # fmt: skip
    line = one_line(*run_cli(argv)[::2])
    assert fragment in line, line
    assert not (tmp_path / "eval").exists() and not (tmp_path / "lat.json").exists()


def test_the_one_output_graph_is_scored(tmp_path, run_cli):
    """The same graph with one output is a valid (untrained) embedding model: eval runs and reports."""
    path = tmp_path / "model.onnx"
    onnx.save(_graph(), path)
    code, _, err = run_cli(["eval", str(path), "--pairs", PAIRS, "--out", str(tmp_path / "eval")])
    assert code in (0, None), err
    assert (tmp_path / "eval" / "eval.json").is_file()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from edgekd.cli import main

    out = tmp_path_factory.mktemp("ckpt") / "t"
    argv = ["teacher", "--data", "synthetic:identities=6,images_per_identity=4,image_size=16", "--model", "r_tiny",
            "--batch-size", "8", "--steps", "1", "--device", "cpu", "--no-compile", "--out", str(out)]  # fmt: skip
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None)
    return out / "teacher.safetensors"


@pytest.mark.parametrize("opset", [9, 11, 13])
def test_an_opset_the_exporter_cannot_write_is_refused(opset, checkpoint, tmp_path, run_cli, one_line):
    out = tmp_path / f"m{opset}.onnx"
    line = one_line(*run_cli(["export", str(checkpoint), "--opset", str(opset), "--out", str(out)])[::2])
    assert f"cannot write opset {opset}" in line and "--opset 18" in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opset", [17, 18, 20])
def test_the_sidecar_names_the_opset_the_file_imports(opset, checkpoint, tmp_path, run_cli):
    from edgekd.export.passes.onnx import default_opset

    out = tmp_path / f"m{opset}.onnx"
    code, _, err = run_cli(["export", str(checkpoint), "--opset", str(opset), "--out", str(out)])
    assert code in (0, None), err
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["opset"] == default_opset(onnx.load(out)) == opset
    assert sidecar["format_version"] == 1  # the export sidecar's format (edgekd/formats.py)


@pytest.mark.parametrize(
    "backends, fragment",
    [
        (["tensorrt"], "tensorrt: needs a TensorRT .plan"),
        (["ort-cuda"], "ort-cuda: no CUDA device"),
        (["tensorrt", "ort-cuda"], "ort-cuda: no CUDA device"),
    ],
)
def test_benchmark_latency_with_nothing_it_can_time_is_refused(
    backends, fragment, checkpoint, tmp_path, run_cli, one_line
):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine can time ort-cuda")
    argv = ["benchmark-latency", str(checkpoint), "--json", str(tmp_path / "lat.json")]
    for b in backends:
        argv += ["--backend", b]
    line = one_line(*run_cli(argv)[::2])
    assert line.startswith("edgekd: error: nothing could be timed here") and fragment in line, line
    assert not (tmp_path / "lat.json").exists()
