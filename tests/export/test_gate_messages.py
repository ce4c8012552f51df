"""A failed gate says which gate failed (issue 25, item 6): the parity header gives the parity gate's own verdict
(it said FAIL when only the task gate had failed), and the one-line error names the failed metric, its sampling
noise at the gate's pair count, the --max-drop in force and what to try for the precision."""

from __future__ import annotations

import math

import pytest

from edgekd.export.checks.gates import GateFailed, GateReport, ParityRow, TaskResult


def _report(task_passed: bool, parity_passed: bool = True, precision: str = "int8") -> GateReport:
    row = ParityRow("generated", 1, 64, 0.999, 0.9992, 0.9996, 1e-3, 1e-3, 0.0, parity_passed)
    ref = {"accuracy": 90.0, "tar@far=0.01": 40.0}
    cand = {"accuracy": 90.0 if task_passed else 87.5, "tar@far=0.01": 39.5}
    drop = {k: ref[k] - cand[k] for k in ref}
    task = TaskResult("pairs", ref, cand, drop, max_drop=1.0, passed=task_passed, n_pairs=600)
    failures = [] if parity_passed else ["generated batch 1: mean cosine 0.990000 < 0.995"]
    failures += [] if task_passed else ["task gate: accuracy dropped 2.50 points (> 1.0)"]
    return GateReport("m.onnx", precision, "mean", 0.995, [row], task, failures)


def test_the_parity_header_says_pass_when_only_the_task_gate_failed():
    text = _report(task_passed=False).format()
    assert "per-row cosine mean >= 0.995 -> PASS" in text.splitlines()[0]
    assert "task gate on pairs, 600 pairs, flip-summed (max drop 1.0 points): FAIL" in text
    se = 100 * math.sqrt(0.9 * 0.1 / 600)  # the table shows each metric's noise at the pair count, failed or not
    assert any(line.split()[:1] == ["accuracy"] and line.split()[-1] == f"{se:.2f}" for line in text.splitlines())


def test_the_error_names_the_gate_its_noise_and_what_to_try():
    with pytest.raises(GateFailed) as caught:
        _report(task_passed=False).raise_if_failed()
    message = str(caught.value)
    assert "\n" not in message and message.startswith("m.onnx failed its int8 gate: task gate: accuracy dropped 2.50")
    se = 100 * math.sqrt(0.9 * 0.1 / 600)  # binomial standard error of a 90 % accuracy over 600 pairs: 1.22 points
    assert f"accuracy ±{se:.2f}" in message and "600 pairs" in message and "--max-drop" in message
    assert "--calib-method" in message and "--keep-first" in message


def test_a_tar_s_noise_counts_the_genuine_pairs_only():
    task = _report(task_passed=False).task
    assert task.noise_points("tar@far=0.01") == pytest.approx(100 * math.sqrt(0.4 * 0.6 / 300), rel=1e-12)


def test_a_parity_failure_alone_gets_the_precision_s_advice_without_task_noise():
    with pytest.raises(GateFailed) as caught:
        _report(task_passed=True, parity_passed=False, precision="fp16").raise_if_failed()
    message = str(caught.value)
    assert "mean cosine 0.990000 < 0.995" in message and "noise" not in message and "--precision fp32" in message
