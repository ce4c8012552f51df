"""``edgekd export --target executorch``: FP32 and INT8 ``.pte`` programs of a trained student pass their gates as
ExecuTorch's own runtime runs them; a partition that leaves the model outside XNNPACK, or a quantizer that ruins it,
is refused with nothing written; the runtime meets the program's batch of 1 and survives thread-pool changes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from edgekd.bundle import load_bundle
from edgekd.errors import EdgekdError
from edgekd.export.artifact import gate_inputs
from edgekd.export.checks.gates import cosine_rows
from edgekd.export.options import ExportOptions
from edgekd.export.passes.onnx import model_metadata
from edgekd.export.pipeline import export_checkpoint
from edgekd.export.runtimes import ExecuTorchRuntime, open_runtime
from edgekd.utils.hashing import file_sha256

pytest.importorskip("executorch", reason="needs the executorch extra (pip install 'edgekd[executorch]')")

# Lowering alone takes 10-40 s per program on a small CPU machine (ExecuTorch's passes, not the model's size): every
# test that lowers one is slow.
slow = pytest.mark.slow

# What an ONNX export's sidecar records, which a program's must record too (ExecuTorch's route adds its own keys).
ONNX_SIDECAR_KEYS = {
    "artifact", "kind", "precision", "checkpoint", "checkpoint_sha256", "model", "static_batch", "calibration", "gate",
    "environment",
}  # fmt: skip


def _weighted_layers(model: torch.nn.Module) -> dict[str, int]:
    """The convolutions and linear layers of ``model``: what XNNPACK must run, counted from the module tree."""
    return {
        "aten.convolution": sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()),
        "aten.linear": sum(isinstance(m, torch.nn.Linear) for m in model.modules()),
    }


def _embeddings(ckpt, program, faces: str | None = None, n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch FP32 and the program's embeddings of the same ``n`` images: random normalized ones, or held-out faces of
    the synthetic spec ``faces`` (seeded apart from the gate's images)."""
    backbone = load_bundle(ckpt).backbone.eval()
    if faces is None:
        x = torch.randn(n, *backbone.cfg.input_size, generator=torch.Generator().manual_seed(7))
    else:
        x = gate_inputs(backbone.cfg, n, seed=7, real=None, with_noise=False, generated=faces)["synthetic"]
    with torch.no_grad():
        reference = backbone(x).numpy()
    return reference, ExecuTorchRuntime(program)(x).numpy()


@slow
def test_fp32_program_passes_its_gates_and_carries_the_contract(
    tmp_path, trained_student, student_gate_options, network_atol
):
    out = tmp_path / "student.fp32.pte"
    result = export_checkpoint(trained_student, out, ExportOptions(target="executorch", **student_gate_options))

    assert result.program == out and out.is_file() and result.onnx is None and result.gate.passed
    assert result.gate.statistic == "min" and result.gate.threshold == 0.99999
    assert {r.batch for r in result.gate.rows} == {1} and {r.source for r in result.gate.rows} == {"synthetic", "noise"}
    assert result.gate.task is not None and result.gate.task.passed
    assert not list(tmp_path.glob(".*tmp")), "temporary files left behind"

    # XNNPACK runs every convolution and linear layer of the model, nothing is left to the portable kernels
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    backbone = load_bundle(trained_student).backbone
    assert sidecar["delegation"]["outside"] == {} and sidecar["delegation"]["subgraphs"] >= 1
    for op, count in _weighted_layers(backbone).items():
        assert sidecar["delegation"]["delegated"][op] == count
    assert ONNX_SIDECAR_KEYS <= set(sidecar) and sidecar["kind"] == "executorch-program"
    assert sidecar["static_batch"] == 1 and sidecar["gate"]["passed"] and sidecar["versions"]["executorch"]

    # the program carries an ONNX export's metadata, and the runtime reads its contract from it
    runtime = open_runtime(out)
    cfg = backbone.cfg
    expected = model_metadata(cfg, precision="fp32", source_sha256=file_sha256(trained_student), static_batch=1)
    assert runtime.backend == "executorch" and runtime.metadata == expected
    contract = runtime.contract
    assert contract.input_size == (3, 32, 32) and contract.batch == 1 and contract.embed_dim == cfg.embed_dim
    assert contract.mean == tuple(cfg.mean) and contract.std == tuple(cfg.std) and contract.channel_order == "RGB"

    reference, got = _embeddings(trained_student, out)
    assert cosine_rows(reference, got).min() >= 0.99999
    np.testing.assert_allclose(got, reference, rtol=0, atol=network_atol(backbone, reference))


@slow
def test_int8_program_passes_its_gates(tmp_path, trained_student, student_gate_options):
    out = tmp_path / "student.int8.pte"
    options = ExportOptions(target="executorch", precision="int8", calib="builtin", **student_gate_options)
    result = export_checkpoint(trained_student, out, options)

    assert out.is_file() and result.gate.passed
    assert result.gate.statistic == "mean" and result.gate.threshold == 0.995
    task = result.gate.task
    assert task is not None and task.passed and task.max_drop == 0.5
    assert task.reference["accuracy"] > 90  # a trained student, not noise

    # quantized for real: every weighted layer's weight comes through a per-channel dequantize inside XNNPACK
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    delegated = sidecar["delegation"]["delegated"]
    assert sidecar["delegation"]["outside"] == {}
    assert delegated["quantized_decomposed.dequantize_per_channel"] == sum(_weighted_layers(
        load_bundle(trained_student).backbone
    ).values())  # fmt: skip
    assert delegated["quantized_decomposed.quantize_per_tensor"] > 10
    assert sidecar["calibration"]["images"] == 128 and sidecar["calibration"]["source"] == "builtin"
    assert open_runtime(out).metadata["precision"] == "int8"

    # on faces (what it was calibrated for; noise is not, so the INT8 gate runs no noise either)
    reference, got = _embeddings(trained_student, out, faces=student_gate_options["gate_data"])
    cos = cosine_rows(reference, got)
    assert cos.mean() >= 0.995 and cos.min() < 0.99999  # close to FP32, and not FP32 itself


@slow
def test_a_quantizer_that_ruins_the_model_is_refused(tmp_path, trained_student, run_cli):
    """Calibrated on blank (constant grey) images, the activation ranges cannot hold real faces' activations: the INT8
    gate fails and nothing is written."""
    from PIL import Image

    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(8):
        Image.new("RGB", (32, 32), (128, 128, 128)).save(blank / f"{i}.png")
    folder = tmp_path / "out"
    folder.mkdir()
    argv = [
        "export", str(trained_student), "--target", "executorch", "--precision", "int8", "--calib", str(blank),
        "--calib-images", "8", "--gate-images", "16", "--pairs", "synthetic:difficulty=0.5,pairs=200",
        "--out", str(folder / "s.int8.pte"),
    ]  # fmt: skip
    code, out, err = run_cli(argv)
    assert code == 2 and "-> FAIL" in out and "mean cos" in out
    assert err.strip().count("\n") == 0 and err.startswith("edgekd: error: s.int8.pte failed its int8 gate")
    assert list(folder.iterdir()) == [], "a failed gate must leave no program, sidecar or temporary file"


def _all_but_convolution():
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.gemm_configs import ConvolutionConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return [XnnpackPartitioner(configs=[c for c in ALL_PARTITIONER_CONFIGS if c is not ConvolutionConfig])]


@slow
@pytest.mark.parametrize(
    ("partitioners", "message"),
    [
        (lambda: [], "XNNPACK runs none of its operators"),
        (_all_but_convolution, r"aten\.convolution x\d+ left to ExecuTorch's portable kernels"),
    ],
    ids=["nothing-delegated", "convolutions-left-out"],
)
def test_a_broken_partition_is_refused(tmp_path, make_checkpoint, run_cli, monkeypatch, partitioners, message):
    """``_partitioners`` is the builder's seam for this: the program lowered with no partitioner, or with XNNPACK's
    partitioner minus its convolution support, runs (correctly, slowly) in ExecuTorch's portable kernels."""
    import edgekd.export.builders.executorch as builder

    monkeypatch.setattr(builder, "_partitioners", partitioners)
    ckpt = make_checkpoint(tmp_path / "m.safetensors", "mbf_tiny", input_size=32)
    folder = tmp_path / "out"
    folder.mkdir()
    code, out, err = run_cli(["export", str(ckpt), "--target", "executorch", "--out", str(folder / "m.pte")])
    assert code == 2 and "left outside" in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "m.pte failed its XNNPACK delegation check" in lines[0], err
    assert re.search(message, lines[0]), lines[0]
    assert list(folder.iterdir()) == []


@slow
def test_runtime_batches_and_thread_pool_changes(tmp_path, make_checkpoint, network_atol):
    """A batch-1 program runs any number of images (in chunks of 1), refuses to time another batch, and two runtimes
    that size ExecuTorch's one thread pool differently can take turns for hundreds of runs (a method left on a replaced
    pool aborts or hangs the process some 100 runs later)."""
    ckpt = make_checkpoint(tmp_path / "m.safetensors", "mbf_tiny", input_size=32)
    out = tmp_path / "m.pte"
    export_checkpoint(ckpt, out, ExportOptions(target="executorch", gate_images=4))
    backbone = load_bundle(ckpt).backbone.eval()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = backbone(x).numpy()

    one, two = open_runtime(out, threads=1), open_runtime(out, threads=2)
    for _ in range(3):
        for runtime in (one, two):
            step = runtime.prepare(x[:1])
            for _ in range(150):
                step()
            np.testing.assert_allclose(runtime(x).numpy(), reference, rtol=0, atol=network_atol(backbone, reference))
    with pytest.raises(EdgekdError, match="fixed batch of 1"):
        one.prepare(x[:2])
    with pytest.raises(EdgekdError, match="takes 3x32x32"):
        one(torch.zeros(1, 3, 48, 48))


def test_a_file_that_is_no_program_is_a_one_line_error(tmp_path, run_cli):
    bad = tmp_path / "m.pte"
    bad.write_bytes(b"not a flatbuffer" * 8)
    for argv in (["eval", str(bad), "--out", str(tmp_path / "ev")], ["benchmark-latency", str(bad)]):
        code, _, err = run_cli(argv)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "ExecuTorch cannot load m.pte" in lines[0], err
