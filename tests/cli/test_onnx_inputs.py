"""Foreign ONNX files through the real ``edgekd eval`` and ``edgekd benchmark-latency``.

The files are made the way arcface_torch's ``torch2onnx.py`` makes them: ``torch.onnx.export`` of a backbone at
batch 1, input named ``input.1``, no output name and no edgekd metadata. With the TorchScript exporter (opset 11):
once with the batch fixed at 1, once with a dynamic batch axis, and once with torch2onnx's own trick (fixed at export,
then the input's batch dimension renamed to ``'None'``). With today's default dynamo exporter the same trick gives a
graph whose Reshape is traced at batch 1 (reference/face.md §0.3): it declares a dynamic batch but runs only batch 1.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import onnx
import pytest
import torch

PAIRS = "synthetic:pairs=40,pair_identities=6,pair_images=4"
SIZE = 32
KINDS = ("fixed-batch-1", "dynamic-batch", "torch2onnx-None", "traced-at-batch-1")
BATCH_ONE = ("fixed-batch-1", "traced-at-batch-1")  # what edgekd can run them at


def _random_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, so embeddings have a trained network's scale (not ~1e-10)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.3, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    return model.eval()


def torch2onnx(model: torch.nn.Module, kind: str) -> onnx.ModelProto:
    """A foreign ONNX model as arcface_torch's torch2onnx.py writes it (see the module docstring)."""
    example = torch.randn(1, 3, SIZE, SIZE)
    axes = {"input.1": {0: "batch"}} if kind == "dynamic-batch" else None
    if kind == "traced-at-batch-1":
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["input.1"], external_data=False)
        proto = program.model_proto
    else:
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
            torch.onnx.export(
                model, (example,), buf, dynamo=False, opset_version=11, input_names=["input.1"], dynamic_axes=axes
            )
        proto = onnx.load_from_string(buf.getvalue())
    if kind in ("torch2onnx-None", "traced-at-batch-1"):
        proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "None"
    assert not proto.metadata_props
    return proto


@pytest.fixture(scope="module")
def backbone():
    from edgekd.models import create_model

    torch.manual_seed(0)
    return _random_batchnorm(create_model("mbf_tiny", input_size=SIZE))


@pytest.fixture(scope="module")
def files(backbone, tmp_path_factory):
    """The checkpoint and its three foreign ONNX twins."""
    from edgekd.bundle import Bundle, save_bundle

    root = tmp_path_factory.mktemp("foreign")
    paths = {"checkpoint": save_bundle(root / "mbf_tiny.safetensors", Bundle(backbone=backbone))}
    for kind in KINDS:
        paths[kind] = root / f"{kind}.onnx"
        paths[kind].write_bytes(torch2onnx(backbone, kind).SerializeToString())
    return paths


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _eval(run_cli, model, out, *extra):
    code, stdout, err = run_cli(["eval", str(model), "--pairs", PAIRS, "--device", "cpu", "--out", str(out), *extra])
    assert code == 0, err
    return stdout, json.loads((out / "eval.json").read_text())[PAIRS]


@pytest.mark.parametrize("kind", KINDS)
def test_eval_of_foreign_onnx_matches_the_checkpoint(files, kind, run_cli, tmp_path):
    _, reference = _eval(run_cli, files["checkpoint"], tmp_path / "ckpt")
    stdout, result = _eval(run_cli, files[kind], tmp_path / "onnx")
    assert "insightface conventions" in stdout and f"3x{SIZE}x{SIZE} RGB input, (x - 127.5) / 127.5" in stdout
    assert "128-d embedding" in stdout
    assert ("fixed batch 1" in stdout) == (kind in BATCH_ONE)
    assert ("declares a dynamic batch but runs only batch 1" in stdout) == (kind == "traced-at-batch-1")
    assert "accuracy (%)" in stdout and "TAR@FAR (%)" in stdout
    assert abs(result["accuracy"] - reference["accuracy"]) <= 1 / 40  # at most one pair on a threshold's edge
    recorded = json.loads((tmp_path / "onnx" / "eval.json").read_text())["input"]
    assert recorded == {
        "size": [3, SIZE, SIZE],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "source": "insightface conventions",
    }


@pytest.mark.parametrize("kind", KINDS)
def test_foreign_onnx_embeddings_equal_torch(files, backbone, kind):
    from edgekd.data import create_pairs
    from edgekd.data.transforms import normalize
    from edgekd.export.checks.gates import cosine_rows
    from edgekd.export.runtimes import open_runtime

    runtime = open_runtime(files[kind], device="cpu")
    assert runtime.input_size == (3, SIZE, SIZE) and runtime.contract.embed_dim == 128
    images = create_pairs(PAIRS, image_size=SIZE).images[:7]  # 7 rows: a fixed-batch graph runs them one by one
    x = normalize(images, runtime.mean, runtime.std)
    with torch.no_grad():
        expected = backbone(normalize(images, backbone.cfg.mean, backbone.cfg.std)).numpy()
    cosine = cosine_rows(expected, runtime(x).numpy())
    # 1 − cos = ½‖e‖² for a relative error e: 0.9999 allows 1.4 %, where float32 kernels differ by ~1e-6; it fails on
    # a wrong input convention (mean, std, channel order), not on rounding
    assert cosine.min() >= 0.9999, cosine


@pytest.mark.parametrize("kind", KINDS)
def test_benchmark_latency_times_foreign_onnx(files, kind, run_cli, tmp_path):
    out = tmp_path / "lat.json"
    code, stdout, err = run_cli(
        [
            "benchmark-latency", str(files[kind]), "--backend", "ort-cpu", "--batch", "1,2", "--iters", "3",
            "--min-seconds", "0", "--warmup", "1", "--warmup-seconds", "0", "--threads", "1", "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads(out.read_text())["results"]
    assert all(r["status"] == "ok" for r in rows), rows
    if kind in BATCH_ONE:
        assert [r["batch"] for r in rows] == [1]
        assert "runs only batch 1: timing batch 1 only, skipping batch 2" in stdout
    else:
        assert [r["batch"] for r in rows] == [1, 2]
    assert f"has no edgekd metadata; timing it as 3x{SIZE}x{SIZE} RGB input" in stdout


def test_open_spatial_axes_need_image_size(backbone, tmp_path, run_cli):
    """A graph that leaves H and W open and records nothing: eval says to pass --image-size, then works with it."""
    buf = io.BytesIO()
    axes = {"input.1": {0: "n", 2: "h", 3: "w"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            backbone, (torch.randn(1, 3, SIZE, SIZE),), buf, dynamo=False, opset_version=11,
            input_names=["input.1"], dynamic_axes=axes,
        )  # fmt: skip
    path = tmp_path / "open.onnx"
    path.write_bytes(buf.getvalue())
    code, _, err = run_cli(["eval", str(path), "--pairs", PAIRS, "--device", "cpu", "--out", str(tmp_path / "a")])
    assert code == 2 and err.strip().count("\n") == 0 and "--image-size" in err, err
    stdout, result = _eval(run_cli, path, tmp_path / "b", "--image-size", str(SIZE))
    assert f"3x{SIZE}x{SIZE}" in stdout and 0.0 <= result["accuracy"] <= 1.0


def test_mean_and_std_override_the_convention(files, run_cli, tmp_path):
    stdout, _ = _eval(run_cli, files["dynamic-batch"], tmp_path, "--mean", "0", "--std", "255")
    assert "(x - 0) / 255" in stdout


def test_insightface_raw_pixel_rule():
    """insightface's ArcFaceONNX: Sub and Mul among the first 8 node names mean the graph normalizes its input."""
    from edgekd.export.contract import INSIGHTFACE_SOURCE, contract_from_graph

    mxnet = contract_from_graph([None, 3, 112, 112], [None, 512], {}, ["_minusscalar0", "_mulscalar0", "conv0"])
    assert mxnet.source == INSIGHTFACE_SOURCE and mxnet.raw_pixels
    # 1/255 and 0.5 as stored floats: a rounding or two, within allclose's default rtol 1e-5
    assert np.allclose(mxnet.mean, 0.0) and np.allclose(np.asarray(mxnet.std) * 255, 1.0)
    modern = contract_from_graph([1, 3, 112, 112], [1, 512], {}, ["/Sub", "/Mul", "Conv_0"])
    assert not modern.raw_pixels and np.allclose(modern.mean, 0.5) and modern.batch == 1
    assert modern.input_size == (3, 112, 112) and modern.embed_dim == 512
