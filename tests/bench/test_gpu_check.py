"""bench/gpu_check.py: the dry run of every stage on the CPU, and the pieces a GPU run uses that a CPU cannot reach
(its report from GPU-shaped results, the gpu_tests stage's results as tests finish and its time limits, budgets that
flow from stage to stage, the optional wheels, the commit stamp, the markdown merge, importing edgekd from the tree).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import gpu_check
from bench import gpu_check_report as report
from bench import gpu_check_stages as stages
from bench import shared_head_loss as shl
from bench.markdown_section import merge_section
from edgekd.utils.env import source_commit

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_writes_every_stage(tmp_path):
    """The whole script at tiny sizes on the CPU, edgekd imported from the tree as on the GPU image (~50 s on a
    quiet 2-core machine; the stages' own budgets are the GPU run's)."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    started = time.monotonic()
    cmd = [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--from-tree", "--out", str(out),
           "--wheels", str(tmp_path / "no-wheels")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - started
    print(f"dry run: {wall:.0f} s\n{proc.stdout}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + (out / "log.txt").read_text()[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.OUTPUTS)  # the 7 files, nothing else
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["edgekd_from"].startswith("the tree") and summary["install"]["wheels"] == []
    assert {s: v["status"] for s, v in summary["stages"].items()} == {s: "ok" for s in stages.STAGES}
    results = {s: json.loads((out / f"{s}.json").read_text()) for s in stages.STAGES}
    assert all(r["status"] == "ok" and r["dry_run"] for r in results.values())
    environment = results["environment"]["environment"]
    assert environment["versions"]["torch"] and "/tree/edgekd/" in environment["edgekd_kernels"]
    if environment["git_commit_source"] == "git":  # a checkout with git (CI); elsewhere the stamp or nothing
        assert environment["git_commit"][:40] == source_commit(ROOT)[:40]
    tests = results["gpu_tests"]
    assert tests["counts"]["skipped"] > 0 and not tests["counts"]["failed"] and not tests["running"]
    cpu_variants = {t["test"] for t in tests["tests"] if t["outcome"] == "passed"}
    assert cpu_variants and all(t.startswith(stages.FIRST_CONTACT) and t.endswith("[cpu]") for t in cpu_variants)
    gpu_only = {"liger"}  # Liger-Kernel runs on CUDA only
    assert {r["provider"] for r in results["loss"]["rows"] if r.get("median")} == set(shl.PROVIDERS) - gpu_only
    assert all(r.get("peak") is not None for r in results["loss"]["rows"] if r.get("median"))
    assert [r["rate"] for r in results["loss"]["sampling"]] == [1.0, 0.3, 0.1]  # Partial FC rows, C = 64
    assert len(results["distill"]["rows"]) == 4 and all("images_per_s" in r for r in results["distill"]["rows"])
    assert {r["backend"] for r in results["latency"]["rows"] if r["status"] == "ok"} == set(stages.LATENCY_BACKENDS)
    assert "merge into BENCHMARKS.md" in proc.stdout

    benchmarks = tmp_path / "BENCHMARKS.md"
    merge = [sys.executable, "-m", "bench.gpu_check", "--merge", str(out), "--benchmarks", str(benchmarks)]
    subprocess.run(merge, cwd=ROOT, check=True, capture_output=True, timeout=300)
    text = benchmarks.read_text()
    assert report.SECTION + "\n" in text and f"on {summary['date']}. Dry run" in text and "### GPU tests" in text
    assert "### Partial FC sampling" in text


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
        "command": "python -m bench.gpu_check --out o",
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


def test_read_results_folds_starts_and_results(tmp_path):
    path = tmp_path / "results.jsonl"
    lines = [
        {"test": "a::ok", "outcome": "running"},
        {"test": "a::ok", "outcome": "passed", "seconds": 0.5, "message": "", "properties": {"spread": "{}"}},
        {"test": "a::bad", "outcome": "running"},
        {"test": "a::bad", "outcome": "failed", "seconds": 1.0, "message": "assert 1 == 2", "properties": {}},
        {"test": "a::skip", "outcome": "running"},
        {"test": "a::skip", "outcome": "skipped", "seconds": 0.0, "message": "needs a CUDA GPU", "properties": {}},
        {"test": "a::hangs", "outcome": "running"},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"test": "a::cut", "outc')  # killed mid-line
    folded = stages.read_results(path)
    assert folded["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert [t["test"] for t in folded["tests"]] == ["a::ok", "a::bad", "a::skip"] and folded["running"] == ["a::hangs"]
    assert folded["tests"][0]["properties"] == {"spread": "{}"}
    assert stages.read_results(tmp_path / "none.jsonl") == {"counts": dict.fromkeys(stages.COUNTED, 0), "tests": [],
                                                            "running": []}  # fmt: skip


# The gpu_tests stage on these tests, in a process of its own, as gpu_check.py starts it (dry run: the CPU).
TESTS_OF_THE_STAGE = """
import signal, time, pytest

@pytest.mark.gpu
def test_a_passes(record_property):
    record_property("checked", "yes")

@pytest.mark.gpu
def test_b_sleeps():
    time.sleep(60)

@pytest.mark.gpu
def test_c_hangs_where_python_cannot_interrupt():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # as in a C call: the time limit's signal waits
    time.sleep(60)

def test_not_selected():
    pass
"""
STAGE = """
import dataclasses, sys
from pathlib import Path
from bench import gpu_check_stages as stages
stages.GPU_TEST_PATHS = (sys.argv[1],)
stages.DRY = dataclasses.replace(stages.DRY, test_timeout=float(sys.argv[2]))
out = Path(sys.argv[3])
stages.run_stage("gpu_tests", out, out / "work", True, 60.0, "gpu_tests.json")
"""


def _start_stage(tmp_path: Path, test_timeout: float) -> tuple[subprocess.Popen, Path]:
    (tmp_path / "test_stage.py").write_text(TESTS_OF_THE_STAGE)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-c", STAGE, str(tmp_path / "test_stage.py"), str(test_timeout), str(tmp_path)]
    with open(tmp_path / "log.txt", "w") as log:  # the stage's output; the child keeps its own descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, tmp_path / "gpu_tests.json"


@pytest.mark.slow  # a subprocess kill: ~3 s
def test_a_killed_gpu_tests_stage_still_says_what_passed(tmp_path):
    """The stage's JSON holds each test's result as it finishes: killed while a test runs (as gpu_check.py kills a
    stage past its budget), it says what passed and what was running."""
    proc, path = _start_stage(tmp_path, test_timeout=60)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(r.endswith("::test_b_sleeps") for r in (gpu_check.read_json(path) or {}).get("running", [])):
                break
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    data = gpu_check.read_json(path)
    assert data["status"] == "running" and data["counts"] == {"passed": 1, "failed": 0, "error": 0, "skipped": 0}
    assert data["tests"][0]["test"].endswith("test_a_passes") and data["tests"][0]["properties"] == {"checked": "yes"}
    assert [r.rsplit("::", 1)[1] for r in data["running"]] == ["test_b_sleeps"]


@pytest.mark.slow  # pytest, then 1 s and 2.25 s limits: ~7 s
def test_gpu_tests_stage_limits_each_test(tmp_path):
    """Past its time limit a test fails (TestTimeout); one that does not return to Python is ended with a traceback
    a little later, pytest with it, and the stage records it as unfinished."""
    proc, path = _start_stage(tmp_path, test_timeout=1)
    assert proc.wait(timeout=120) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    data = gpu_check.read_json(path)
    outcomes = {t["test"].rsplit("::", 1)[1]: (t["outcome"], t["message"]) for t in data["tests"]}
    assert outcomes["test_a_passes"] == ("passed", "") and outcomes["test_b_sleeps"][0] == "failed"
    assert "over gpu-check's per-test limit of 1 s" in outcomes["test_b_sleeps"][1]
    assert [r.rsplit("::", 1)[1] for r in data["running"]] == ["test_c_hangs_where_python_cannot_interrupt"]
    assert data["status"] == "partial" and data["pytest_exit"] != 0
    log = (tmp_path / "log.txt").read_text()
    assert "Timeout (0:00:02" in log and "test_c_hangs_where_python_cannot_interrupt" in log  # faulthandler's dump


def test_budgets_and_overrides():
    assert gpu_check.INSTALL_S + sum(gpu_check.BUDGET_S.values()) == gpu_check.TOTAL_BUDGET_S
    # The device tool's call is 600 s; with Python's start and the summary the command must end by 540 s.
    assert gpu_check.TOTAL_BUDGET_S + 15 <= 540
    assert gpu_check.budgets(["loss=200"])["loss"] == 200.0
    with pytest.raises(SystemExit):
        gpu_check.budgets(["nope=3"])


def _run_with_fake_stages(tmp_path, monkeypatch, spend: dict, *argv: str) -> tuple[dict, dict, float]:
    """``run_all`` on a fake clock with stages that spend ``spend[stage]`` seconds (at most their budget); the
    seconds each was given, the summary and the clock at the end."""
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(gpu_check, "time", SimpleNamespace(monotonic=lambda: clock.now))
    monkeypatch.setattr(gpu_check, "START", clock.now)
    monkeypatch.setattr(gpu_check, "import_setup", lambda work, from_tree: ({}, "installed (this tree)"))
    given = {}

    def stage(name, args, budget, work, env, log):
        given[name] = budget
        wall = min(budget, spend[name])
        clock.now += wall
        return {"status": "ok", "exit": 0, "wall_s": wall, "budget_s": budget}

    monkeypatch.setattr(gpu_check, "run_stage_process", stage)
    args = gpu_check.parse_args(["--out", str(tmp_path), "--wheels", str(tmp_path / "no-wheels"), *argv])
    summary = gpu_check.run_all(args)
    return given, summary, clock.now - 1000.0


def test_unspent_seconds_flow_to_later_stages(tmp_path, monkeypatch):
    B, install = gpu_check.BUDGET_S, gpu_check.INSTALL_S
    spend = {"environment": 5.0, "gpu_tests": 1e9, "loss": 20.0, "distill": 1e9, "latency": 1e9}
    given, summary, wall = _run_with_fake_stages(tmp_path, monkeypatch, spend)
    assert given == {
        "environment": install + B["environment"],  # no wheel to install: its 30 s are the environment's too
        "gpu_tests": install + B["environment"] - 5 + B["gpu_tests"],
        "loss": B["loss"],  # gpu_tests spent all it had
        "distill": B["loss"] - 20 + B["distill"],
        "latency": B["latency"],
    }
    assert wall == summary["wall_s"] == gpu_check.TOTAL_BUDGET_S
    assert summary["stages"]["distill"]["own_budget_s"] == B["distill"]

    given, summary, wall = _run_with_fake_stages(tmp_path, monkeypatch, spend, "--total-budget", "60")
    assert given == {"environment": 55, "gpu_tests": 55} and wall == 60  # never past the total
    assert summary["stages"]["loss"]["status"] == "not run: total budget spent"


def _wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel of one module, ``name``."""
    path = folder / f"{name}-0.1-py3-none-any.whl"
    info = f"{name}-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{name}.py", "VALUE = 1\n")
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", f"{name}.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path


def test_an_optional_wheel_that_fails_to_install_warns_and_the_others_go_on(tmp_path, capsys):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels, "gpu_check_good")
    (wheels / "broken-0.1-py3-none-any.whl").write_bytes(b"not a zip file")
    with open(tmp_path / "log.txt", "w") as log:
        result = gpu_check.install_wheels(wheels, tmp_path / "site", 120, log)
        assert gpu_check.install_wheels(tmp_path / "none", tmp_path / "site", 120, log)["wheels"] == []
    assert result["installed"] == ["gpu_check_good-0.1-py3-none-any.whl"]
    assert list(result["failed"]) == ["broken-0.1-py3-none-any.whl"], result
    assert "warning: optional wheel broken-0.1-py3-none-any.whl did not install" in capsys.readouterr().out
    env = dict(os.environ, **gpu_check.with_site({}, tmp_path / "site"))
    code = "import gpu_check_good; print(gpu_check_good.VALUE)"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "1\n"


def test_the_commit_comes_from_the_stamp_where_git_is_missing(tmp_path):
    """A device run's tree has no .git: the environment stage reads the commit ``make gpu-stamp`` wrote."""
    stamp = tmp_path / ".gpu-check-commit"
    commit, source = stages.recorded_commit(tmp_path, stamp)
    assert commit is None and "make gpu-stamp" in source
    here = source_commit(ROOT)
    if here is None:
        pytest.skip("no git checkout here to stamp")
    assert gpu_check.write_stamp(stamp) == here
    commit, source = stages.recorded_commit(tmp_path, stamp)  # tmp_path is no checkout: git answers nothing
    assert commit == here and source.startswith(".gpu-check-commit, stamped 20")
    assert stages.recorded_commit(ROOT, stamp) == (source_commit(ROOT), "git")


def test_the_documented_device_command_fits_one_call():
    """The command in gpu_check.py's docstring: at most 2,000 characters, no install step that could end it."""
    (command,) = [line.strip() for line in gpu_check.__doc__.splitlines() if line.startswith("    export ")]
    assert len(command) <= 2000 and "exit 1" not in command and "python3 -m bench.gpu_check --out $OUT" in command


def test_latency_stage_times_backends_the_benchmark_knows():
    from edgekd.export.latency import LATENCY_BACKENDS

    assert set(stages.LATENCY_BACKENDS) <= set(LATENCY_BACKENDS) and stages.LATENCY_BACKENDS[-1] == "torch-compile"


def test_outputs_fit_the_device_tool():
    """At most 8 files come back from a device run, named in letters, digits, '.', '_' and '-': 7 outputs leave a
    slot for a temporary that a kill left beside them (write_json's ``.tmp``)."""
    assert len(gpu_check.OUTPUTS) <= 7 and all(n.replace(".", "").replace("_", "").isalnum() for n in gpu_check.OUTPUTS)


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


def test_the_stages_import_bench_from_the_root_and_edgekd_from_the_overlay(tmp_path):
    """A stage runs as ``python -m bench.gpu_check`` from the root, whose edgekd/ lacks the side folders: the stages'
    environment keeps the current folder off sys.path, so the overlay's edgekd comes first and bench from the root."""
    extra, _ = gpu_check.import_setup(tmp_path, from_tree=True)
    env = gpu_check.child_env(False, tmp_path, extra)
    code = "import bench, edgekd; print(bench.__file__); print(edgekd.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    bench_file, edgekd_file = out.stdout.split()
    assert bench_file == str(ROOT / "bench" / "__init__.py") and edgekd_file.startswith(str(tmp_path / "tree"))
