"""``edgekd benchmark-latency``: statistics, and a JSON report with every field for ORT CPU and torch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekd.export.latency import RESULT_FIELDS, STAT_KEYS, stats_ms


def test_stats_ms_known_samples():
    s = stats_ms(np.arange(1, 101) * 1_000_000)  # 1 ... 100 ms
    assert s["min"] == 1.0 and s["max"] == 100.0 and s["median"] == 50.5 and s["mean"] == 50.5
    # min/max/median/mean of whole milliseconds are exact; the percentiles interpolate (90 + 0.1·1): approx's 1e-6
    assert s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)
    assert set(s) == set(STAT_KEYS)


def test_percentiles_need_enough_runs():
    """p90 from 10 runs, p95 from 20, p99 from 100: fewer would report the maximum under another name."""
    from edgekd.export.latency import DEFAULT_ITERS, format_latency_table

    few = stats_ms(np.arange(1, 16) * 1_000_000)  # 15 runs
    assert few["p90"] is not None and few["p95"] is None and few["p99"] is None
    assert stats_ms(np.arange(1, 10) * 1_000_000)["p90"] is None
    assert DEFAULT_ITERS >= 100
    row = {
        "model": "m.onnx", "backend": "ort-cpu", "precision": "fp32", "batch": 8, "iters": 15, "status": "ok",
        "latency_ms": few, "throughput_items_per_s": 1.0, "cuda_graph": False, "e2e_ms": few, "device_ms": None,
    }  # fmt: skip
    table = format_latency_table([row])
    assert "median ms" in table and "ms/image" in table and "p99 needs 100 runs" in table
    assert f"{few['median'] / 8:.3f}" in table  # per image = per batch / batch


def test_benchmark_json_has_every_field(tmp_path, make_checkpoint, capsys):
    from edgekd.cli import main

    ckpt = make_checkpoint(tmp_path / "m.safetensors", "mbf_tiny", input_size=32)
    out = tmp_path / "lat.json"
    main(
        [
            "benchmark-latency",
            str(ckpt),
            "--backend",
            "torch",
            "--backend",
            "ort-cpu",
            "--batch",
            "1,2",
            "--iters",
            "5",
            "--min-seconds",
            "0",
            "--warmup",
            "2",
            "--warmup-seconds",
            "0",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    table = capsys.readouterr().out
    assert "ort-cpu" in table and "torch" in table and "median" in table

    report = json.loads(out.read_text())
    env = report["environment"]
    assert env["versions"]["torch"] and env["versions"]["onnxruntime"] and env["versions"]["edgekd"]
    assert env["cpu"] and env["threads"]["logical_cpus"] and env["benchmark_threads"] == 1
    assert report["config"]["warmup_iters"] == 2 and report["config"]["batches"] == [1, 2]
    rows = report["results"]
    assert {(r["backend"], r["batch"]) for r in rows} == {("torch", 1), ("torch", 2), ("ort-cpu", 1), ("ort-cpu", 2)}
    for r in rows:
        assert set(RESULT_FIELDS) <= set(r), set(RESULT_FIELDS) - set(r)
        assert r["status"] == "ok" and r["device"] == "cpu" and r["threads"] == 1 and r["precision"] == "fp32"
        assert r["iters"] >= 5 and r["warmup_iters"] >= 2 and len(r["model_sha256"]) == 16
        assert set(r["latency_ms"]) == set(STAT_KEYS) and r["latency_ms"] == r["e2e_ms"]
        assert 0 < r["latency_ms"]["min"] <= r["latency_ms"]["median"] <= r["latency_ms"]["max"]
        assert r["latency_ms"]["p99"] is None  # fewer than 100 runs: p99 would only be the maximum again
        assert r["throughput_items_per_s"] > 0 and r["device_ms"] is None
    assert out.with_suffix(".png").stat().st_size > 1000


def test_unavailable_backends_are_reported_not_faked(tmp_path, make_checkpoint):
    from edgekd.export.latency import LatencyConfig, ModelSpec, run_benchmark
    from edgekd.export.runtimes import ort_cuda_available

    if ort_cuda_available():
        pytest.skip("a GPU is present; nothing to report as unavailable")
    ckpt = make_checkpoint(tmp_path / "m.safetensors", "mbf_tiny", input_size=32)
    from edgekd.bundle import load_bundle

    spec = ModelSpec(path=str(ckpt), name="m", module=load_bundle(ckpt).backbone, onnx=None, input_size=(3, 32, 32))
    rows = run_benchmark([spec], ["ort-cuda", "tensorrt"], LatencyConfig(batches=(1,)))
    assert [r["status"].split(":")[0] for r in rows] == ["skipped", "skipped"]
