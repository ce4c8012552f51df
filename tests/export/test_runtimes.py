"""``open_runtime(source, backend=None)``: the backend picked from the source, every backend named in one registry,
and the CLI's choices taken from it."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from edgekd.errors import EdgekdError, MissingDependency
from edgekd.export.latency import LATENCY_BACKENDS
from edgekd.export.options import PRECISIONS
from edgekd.export.passes.onnx import export_onnx, model_metadata, save_onnx
from edgekd.export.runtimes import BACKENDS, FILE_KINDS, OrtRuntime, Runtime, TorchRuntime, file_kind, open_runtime
from tests.tiny_models import mbf_tiny_at_trained_scale

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint (BatchNorm statistics randomized, so embeddings have a trained scale), its backbone and its
    FP32 ONNX export."""
    from edgekd.bundle import Bundle, save_bundle

    root = tmp_path_factory.mktemp("runtimes")
    model = mbf_tiny_at_trained_scale()
    onnx_path = save_onnx(export_onnx(model, model.cfg, metadata=model_metadata(model.cfg)), root / "m.onnx")
    checkpoint = save_bundle(root / "m.safetensors", Bundle(backbone=model))
    return {"model": model, "checkpoint": checkpoint, "onnx": onnx_path}


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_file_kind_reads_every_registered_suffix(kind):
    for suffix in FILE_KINDS[kind]:
        assert file_kind(f"some/model{suffix}") == kind
    assert file_kind("model.txt") is None


@pytest.mark.parametrize("name", BACKENDS)
def test_every_backend_runs_a_registered_kind(name):
    backend = BACKENDS[name]
    assert backend.name == name and backend.runs in FILE_KINDS
    assert backend.device in (None, "cpu", "cuda")


def test_the_cli_offers_the_registries():
    from edgekd.cli.benchmark_latency import command as benchmark
    from edgekd.cli.export import command as export

    def choices(command, name):
        return tuple(next(p for p in command.params if p.name == name).type.choices)

    assert choices(benchmark, "backends") == LATENCY_BACKENDS
    assert set(LATENCY_BACKENDS) == {name for name, backend in BACKENDS.items() if backend.timed}
    assert choices(export, "precision") == PRECISIONS


def test_backend_picked_from_the_source(files, network_atol):
    x = torch.randn(3, *files["model"].cfg.input_size)
    with torch.no_grad():
        expected = files["model"](x).numpy()
    opened = {
        "module": open_runtime(files["model"], device="cpu"),
        "checkpoint": open_runtime(files["checkpoint"], device="cpu"),
        "onnx": open_runtime(files["onnx"], device="cpu"),
    }
    assert isinstance(opened["module"], TorchRuntime) and isinstance(opened["checkpoint"], TorchRuntime)
    assert isinstance(opened["onnx"], OrtRuntime) and opened["onnx"].backend == "ort-cpu"
    for runtime in opened.values():
        assert isinstance(runtime, Runtime)
        # torch on the same module: the same kernels; ONNX Runtime: its own (network_atol, tests/conftest.py)
        np.testing.assert_allclose(runtime(x).numpy(), expected, rtol=0, atol=network_atol(files["model"], expected))


def test_a_named_backend_takes_any_file_name(files, tmp_path):
    """The gates open an artifact under its temporary name: a named backend does not look at the suffix."""
    staged = tmp_path / ".m.onnx.abcdefgh.tmp"
    staged.write_bytes(files["onnx"].read_bytes())
    runtime = open_runtime(staged, "ort-cpu", cpu_rewrites=False)
    assert runtime.backend == "ort-cpu" and runtime.rewrites == {}
    compiled = open_runtime(files["model"], "torch-compile", device="cpu")
    assert compiled.backend == "torch-compile"


@pytest.mark.parametrize(
    ("source", "backend", "message"),
    [
        ("missing.onnx", None, "does not exist"),
        ("weights.txt", None, "expected an .onnx file"),
        ("onnx", "tensorflow", "unknown backend 'tensorflow'"),
        ("model", "ort-cpu", "needs a file, not a module"),
    ],
)
def test_bad_sources_are_one_line_errors(files, tmp_path, source, backend, message):
    (tmp_path / "weights.txt").write_text("not a model")
    source = files.get(source, tmp_path / source)
    with pytest.raises(EdgekdError, match=message):
        open_runtime(source, backend)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_an_engine_without_tensorrt_says_what_to_install(tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"\x00" * 16)
    with pytest.raises(MissingDependency, match=r"edgekd\[trt\]"):
        open_runtime(plan)
