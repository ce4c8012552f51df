"""A phone-ready student from the command line: ``edgekd export --target executorch``, then ``edgekd eval`` and
``edgekd benchmark-latency`` on the ``.pte``, its row in the same table and JSON as torch and ONNX Runtime."""

from __future__ import annotations

import json

import pytest

from tests.tiny_models import mbf_tiny_at_trained_scale

pytest.importorskip("executorch", reason="needs the executorch extra (pip install 'edgekd[executorch]')")

pytestmark = pytest.mark.slow  # ExecuTorch's lowering takes 10-40 s on a small CPU machine


@pytest.fixture
def checkpoint(tmp_path):
    """An untrained mbf_tiny at 32x32 with BatchNorm statistics that give it a trained network's activation scale."""
    from edgekd.bundle import Bundle, save_bundle

    return save_bundle(tmp_path / "m.safetensors", Bundle(backbone=mbf_tiny_at_trained_scale()))


def test_export_eval_and_benchmark_a_program(tmp_path, checkpoint, run_cli):
    code, out, err = run_cli(["export", str(checkpoint), "--target", "executorch", "--gate-images", "8"])
    program = tmp_path / "m.fp32.pte"  # the default name, beside the checkpoint
    assert code == 0, err
    assert program.is_file() and (tmp_path / "m.fp32.pte.json").is_file()
    assert "XNNPACK runs" in out and "left outside: nothing" in out and "-> PASS" in out

    code, out, err = run_cli(["eval", str(program), "--pairs", "synthetic:pairs=200", "--out", str(tmp_path / "ev")])
    assert code == 0, err
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["input"] == {"size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "source": "edgekd metadata"}
    assert 0.0 <= report["synthetic:pairs=200"]["accuracy"] <= 1.0

    latency = tmp_path / "lat.json"
    argv = [
        "benchmark-latency", str(checkpoint), str(program), "--backend", "torch", "--backend", "ort-cpu",
        "--backend", "executorch", "--batch", "1,2", "--iters", "5", "--min-seconds", "0", "--warmup", "2",
        "--warmup-seconds", "0", "--threads", "1", "--json", str(latency),
    ]  # fmt: skip
    code, out, err = run_cli(argv)
    assert code == 0, err
    assert "m.fp32.pte runs only batch 1" in out
    table = [line.split() for line in out.splitlines() if line.startswith(("m.safetensors", "m.fp32.pte"))]
    assert ["m.fp32.pte", "executorch", "fp32", "1"] in [row[:4] for row in table]
    rows = {(r["model"], r["backend"], r["batch"]): r for r in json.loads(latency.read_text())["results"]}
    # one table: torch and ONNX Runtime time the checkpoint, ExecuTorch its program at the batch it fixes
    assert {key for key, r in rows.items() if r["status"] == "ok"} == {
        ("m.safetensors", "torch", 1), ("m.safetensors", "torch", 2),
        ("m.safetensors", "ort-cpu", 1), ("m.safetensors", "ort-cpu", 2), ("m.fp32.pte", "executorch", 1),
    }  # fmt: skip
    row = rows[("m.fp32.pte", "executorch", 1)]
    assert row["device"] == "cpu" and row["threads"] == 1 and row["precision"] == "fp32" and row["iters"] >= 5
    assert 0 < row["latency_ms"]["min"] <= row["latency_ms"]["median"]
    assert rows[("m.fp32.pte", "executorch", 1)]["model_sha256"] != rows[("m.safetensors", "torch", 1)]["model_sha256"]
