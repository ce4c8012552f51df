"""bench/gpu_check.py: the dry run of every stage on the CPU, and the pieces a GPU run uses that a CPU cannot reach
(its report from GPU-shaped results, junit parsing, budgets, the markdown merge, importing edgekd from the tree)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
import gpu_check_report as report  # noqa: E402
import gpu_check_stages as stages  # noqa: E402
import shared_head_loss as shl  # noqa: E402
from markdown_section import merge_section  # noqa: E402


@pytest.mark.slow
def test_dry_run_writes_every_stage(tmp_path):
    """The whole script at tiny sizes on the CPU, edgekd imported from the tree as on the GPU image (~35 s on a
    quiet 2-core machine; the stages' own budgets are the GPU run's)."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    started = time.monotonic()
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--from-tree", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - started
    print(f"dry run: {wall:.0f} s\n{proc.stdout}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + (out / "log.txt").read_text()[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.OUTPUTS)  # the 8 files, nothing else
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["edgekd_from"].startswith("the tree")
    assert {s: v["status"] for s, v in summary["stages"].items()} == {s: "ok" for s in stages.STAGES}
    results = {s: json.loads((out / f"{s}.json").read_text()) for s in stages.STAGES}
    assert all(r["status"] == "ok" and r["dry_run"] for r in results.values())
    assert results["environment"]["environment"]["versions"]["torch"]
    assert "/tree/edgekd/" in results["environment"]["environment"]["edgekd_kernels"]
    assert results["gpu_tests"]["counts"]["skipped"] > 0 and not results["gpu_tests"]["counts"]["failed"]
    gpu_only = {"liger"}  # Liger-Kernel runs on CUDA only
    assert {r["provider"] for r in results["loss"]["rows"] if r.get("median")} == set(shl.PROVIDERS) - gpu_only
    assert all(r.get("peak") is not None for r in results["loss"]["rows"] if r.get("median"))
    assert len(results["distill"]["rows"]) == 4 and all("images_per_s" in r for r in results["distill"]["rows"])
    assert {r["backend"] for r in results["latency"]["rows"] if r["status"] == "ok"} == set(stages.LATENCY_BACKENDS)
    assert (out / "gpu_check.md").read_text().startswith(report.SECTION + "\n")
    assert "merge into BENCHMARKS.md" in proc.stdout


# --------------------------------------------------------------------------------- a GPU run's results, rendered


def gpu_results() -> tuple[dict, dict]:
    """Stage results shaped like a GPU run's (one of each kind of row: timed, failed, not applicable, skipped)."""
    env = {
        "versions": {"torch": "2.11.0+cu130", "triton": "3.6.0", "onnxruntime": "1.30.0", "python": "3.12.3"},
        "cpu": "x86",
        "gpu": {"name": "NVIDIA H200", "memory_gib": 139.8, "cuda": "13.0", "multiprocessors": 132},
        "nvidia_smi": {"driver_version": "580.159.04"},
        "liger_kernel": "0.8.5",
        "git_commit": "0123456789abcdef",
    }
    spread = {
        "dtype": "torch.float32",
        "runs": 20,
        "spread": {"losses": 0.0, "dz_s": 3e-8, "dz_st": 2e-8, "dW_s": 0.0},
        "distinct_results": {"losses": 1, "dz_s": 4, "dz_st": 3, "dW_s": 1},
    }
    tests = {
        "command": "pytest -m gpu tests/losses tests/kernels",
        "counts": {"passed": 30, "failed": 1, "error": 0, "skipped": 0},
        "tests": [
            {
                "test": "t::test_atomics",
                "outcome": "passed",
                "seconds": 1.0,
                "message": "",
                "properties": {"spread": json.dumps(spread)},
            },
            {
                "test": "t::test_backend",
                "outcome": "failed",
                "seconds": 1.0,
                "message": "AssertionError: dz_s",
                "properties": {},
            },
        ],
    }
    row = dict(dtype="bfloat16", B=512, D=512, device="cuda", rounds=5, runs=4)
    loss_rows = []
    for C in (100_000, 1_000_000):
        floor = 0.1 * C / 1e5
        loss_rows += [
            dict(
                row, case="plain_ce", provider="reference", C=C, floor=floor, median=1.5, p20=1.4, p80=1.6, peak=2**30
            ),
            dict(row, case="plain_ce", provider="triton", C=C, floor=floor, median=0.5, p20=0.4, p80=0.6, peak=2**20),
            dict(row, case="plain_ce", provider="liger", C=C, floor=floor, note="not installed", peak=None),
            dict(row, case="full", provider="compile", C=C, floor=floor, note="time,memory worker failed (exit 1): X"),
        ]
    loss_rows.append(
        dict(row, case="full", provider="*", C=2_000_000, note="not run: the stage's time budget was spent")
    )
    loss = {
        "config": {"loss_B": 512, "loss_D": 512},
        "method": ["Time: ..."],
        "rows": loss_rows,
        "ceilings": {"tflops": 790.0, "tbps": 4.3, "source": "measured"},
        "spec_ceilings": {"tflops": 989.0, "tbps": 4.8, "source": "spec sheet"},
    }
    distill = {
        "config": {"student": "mbf", "teacher": "r50", "batch_size": 256, "image_size": 112},
        "autocast": "bf16",
        "rows": [
            {
                "setting": "compiled, live teacher",
                "classes": 16,
                "images_per_s": 9000.0,
                "ms_per_step": 28.4,
                "wall_s": 60,
            },
            {"setting": "compiled, teacher cache, C=1,000,000", "classes": 10**6, "note": "OutOfMemoryError: x"},
        ],
    }
    lat = {"median": 1.0, "p90": 1.1}
    latency = {
        "config": {"latency_model": "mbf"},
        "rows": [
            {"backend": "torch", "cuda_graph": False, "batch": 1, "status": "ok", "latency_ms": lat},
            {"backend": "torch", "cuda_graph": True, "batch": 1, "status": "ok", "latency_ms": lat},
            {
                "backend": "torch-compile",
                "cuda_graph": False,
                "batch": 64,
                "status": "failed: boom",
                "latency_ms": None,
            },
            {
                "backend": "ort-cpu",
                "cuda_graph": False,
                "batch": 1,
                "status": "skipped: no onnxruntime",
                "latency_ms": None,
            },
        ],
    }
    results = {
        "environment": {"environment": env, "status": "ok"},
        "gpu_tests": tests,
        "loss": loss,
        "distill": distill,
        "latency": latency,
    }
    summary = {
        "command": "python bench/gpu_check.py --out o",
        "dry_run": False,
        "budget_s": 480.0,
        "wall_s": 400.0,
        "edgekd_from": "the tree",
        "stages": {s: {"status": "ok", "wall_s": 10.0, "budget_s": 30.0} for s in stages.STAGES},
    }
    return results, summary


def test_report_renders_gpu_shaped_results():
    results, summary = gpu_results()
    text = "\n".join(report.markdown_lines(results, summary))
    assert text.startswith("## GPU check\n") and "NVIDIA H200 (132 SMs, 139.8 GiB), driver 580.159.04" in text
    assert "t::test_backend: AssertionError: dz_s" in text and "distinct results of 20" in text
    assert "F = 790 TFLOP/s and BW = 4.30 TB/s" in text and "spec sheet 989 TFLOP/s" in text
    assert "| plain_ce | liger | bfloat16 | 512 | 512 | 100000 |" in text and "spent): full C=2,000,000." in text
    assert "| torch+graph | 1.000 |" in text and "OutOfMemoryError" in text
    lines = report.summary_lines(results, summary, "o")
    assert len(lines) <= 45 and max(map(len, lines)) <= 160, "\n".join(lines)
    screen = "\n".join(lines)
    assert "FAILED t::test_backend" in screen and "live teacher 9,000" in screen and "1,000,000 failed" in screen
    assert "plain_ce C=100,000" in screen and "n/a" in screen and "failed" in screen


def test_report_survives_missing_stage_files():
    _, summary = gpu_results()
    empty = dict.fromkeys(stages.STAGES)
    assert report.markdown_lines(empty, summary)[0] == report.SECTION
    assert any("no results file" in line for line in report.summary_lines(empty, summary, "o"))


# -------------------------------------------------------------------------------------------------- the pieces


def test_parse_junit(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="a" name="ok" time="0.5"><properties><property name="spread" value="{}"/></properties>'
        "</testcase>"
        '<testcase classname="a" name="bad" time="1"><failure message="assert 1 == 2&#10;more">tb</failure></testcase>'
        '<testcase classname="a" name="skip" time="0"><skipped message="needs a CUDA GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    parsed = stages.parse_junit(xml)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert parsed["tests"][0]["properties"] == {"spread": "{}"} and parsed["tests"][1]["message"] == "assert 1 == 2"


def test_budgets_and_overrides():
    assert sum(gpu_check.BUDGET_S.values()) <= gpu_check.TOTAL_BUDGET_S == 480
    assert gpu_check.budgets(["loss=200"])["loss"] == 200.0
    with pytest.raises(SystemExit):
        gpu_check.budgets(["nope=3"])


def test_latency_stage_times_backends_the_benchmark_knows():
    from edgekd.export.latency import LATENCY_BACKENDS

    assert set(stages.LATENCY_BACKENDS) <= set(LATENCY_BACKENDS) and stages.LATENCY_BACKENDS[-1] == "torch-compile"


def test_outputs_fit_the_device_tool():
    """At most 8 files come back from a device run, named in letters, digits, '.', '_' and '-'."""
    assert len(gpu_check.OUTPUTS) <= 8 and all(n.replace(".", "").replace("_", "").isalnum() for n in gpu_check.OUTPUTS)


def test_merge_section_replaces_only_its_section(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## A\n\nold a\n\n## GPU check\n\nold\n\n## B\n\nb\n")
    merge_section(path, "## GPU check", ["## GPU check", "", "new"])
    assert path.read_text() == "# Benchmarks\n\n## A\n\nold a\n\n## GPU check\n\nnew\n\n## B\n\nb\n"
    merge_section(path, "## C", ["## C", "", "c"])
    assert path.read_text().endswith("## B\n\nb\n\n## C\n\nc\n")
    with pytest.raises(ValueError):
        merge_section(path, "## C", ["no heading"])


def test_tree_overlay_maps_the_side_folders(tmp_path):
    overlay = gpu_check.tree_overlay(tmp_path)
    assert (overlay / "edgekd" / "kernels").resolve() == ROOT / "kernels"
    assert (overlay / "edgekd" / "__init__.py").resolve() == ROOT / "edgekd" / "__init__.py"
    env = dict(os.environ, PYTHONPATH=str(overlay))
    code = "import edgekd.kernels, edgekd.export, edgekd.calib; print(edgekd.kernels.__file__)"
    out = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().startswith(str(overlay)), out.stderr[-2000:]
