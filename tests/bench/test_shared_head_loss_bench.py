"""bench/shared_head_loss.py's method: time and memory from separate workers (shared_head_loss_worker.py), providers
interleaved, the floor."""

from __future__ import annotations

import pytest
import torch

from bench import shared_head_loss as shl
from bench import shared_head_loss_worker as shl_worker
from bench.shared_head_loss_providers import CASES
from edgekd.kernels import interpreting

SPEC = {"device": "cpu", "dtype": "float32", "B": 4, "D": 8, "C": 20, "rounds": 2, "runs": 2, "warmup": 1,
        "threads": None, "compile_backend": "aot_eager"}  # fmt: skip


def test_floor_formula():
    # byte and FLOP counts over decimal ceilings: pytest.approx's 1e-6 leaves aside the last bit
    ceilings = {"tflops": 1000.0, "tbps": 4.0}
    # plain_ce: 3 GEMMs of 2·B·C·D at 1 PFLOP/s = 0.157 ms > 2 matrices of C·D bf16 at 4 TB/s = 0.051 ms.
    assert shl.floor_ms("plain_ce", 512, 512, 100_000, torch.bfloat16, ceilings) == pytest.approx(0.1572864)
    assert shl.floor_ms("full", 512, 512, 100_000, torch.bfloat16, ceilings) == pytest.approx(0.3145728)
    # Memory-bound when B is small: 3 matrices of C·D fp32 at 4 TB/s.
    assert shl.floor_ms("full", 8, 512, 100_000, torch.float32, ceilings) == pytest.approx(3 * 1e5 * 512 * 4 / 4e9)
    assert shl.floor_ms("full", 8, 512, 100_000, torch.float32, None) is None
    assert shl.spec_ceilings("NVIDIA H200", torch.bfloat16)["tbps"] == 4.8


def test_rounds_rotate_the_provider_order():
    assert [shl_worker.rotated(["a", "b", "c"], r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_worker_times_and_measures_every_provider(case):
    providers = ["reference", "compile", "chunked", "triton", "liger"]
    out = shl_worker.worker({"time", "memory"}, dict(SPEC, case=case, providers=providers))
    runnable = [p for p in ("reference", "compile", "chunked", "triton") if p != "triton" or interpreting()]
    for provider in runnable:
        assert len(out[provider]["samples"]) == SPEC["rounds"] * SPEC["runs"], (provider, out[provider])
        assert "peak" in out[provider]
    assert out["liger"]["note"] in (("plain CE only",) if case == "full" else ("not installed", "GPU only"))


def test_measure_config_separates_time_and_memory(monkeypatch):
    calls = []

    def fake_worker(kinds, spec, env=None, timeout=None):
        calls.append((kinds, (env or {}).get("MALLOC_MMAP_THRESHOLD_")))
        if "time" in kinds:
            return {"chunked": {"samples": [1.0, 2.0, 3.0], "warmup_s": 0.1}, "liger": {"note": "GPU only"}}
        return {"chunked": {"peak": 2**20}, "liger": {"note": "GPU only"}}

    monkeypatch.setattr(shl, "run_worker", fake_worker)
    rows = shl.measure_config(dict(SPEC, case="full", providers=["chunked", "liger"]))
    assert calls == [("time", None), ("memory", "65536")]  # CPU: two processes, the memory one with the mmap fix
    assert rows[0]["median"] == 2.0 and rows[0]["peak"] == 2**20 and rows[1]["note"] == "GPU only"
    calls.clear()
    shl.measure_config(dict(SPEC, device="cuda", case="full", providers=["chunked"]), {"tflops": 1.0, "tbps": 1.0})
    assert calls == [("time,memory", None)]  # GPU: one process, memory in a separate pass after the timing
