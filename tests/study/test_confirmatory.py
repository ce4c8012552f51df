"""Study v3 (``edgekd study --v3``): the design's invariants (no test seed chose anything, every row differs from its
control only by its own term or weight, the matched control's total distillation weight is KD+TH's), its statistics
against independent references, and the tiny profile end to end with resume."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from edgekd.study.cells import Cell
from edgekd.study.confirmatory import SELECTION_SEEDS, build_arms
from edgekd.study.confirmatory_report import arm_metric, collect_arm, contrast_rows
from edgekd.study.confirmatory_runner import arm_cells, cell_count
from edgekd.study.grid import row_weights
from edgekd.study.stats import detectable_effect, holm, paired, t_quantile

ARMS = {name: build_arms(name) for name in ("v3", "v3-quick", "v3-tiny")}

# The loss fields a contrast may change, by the kind of its row; everything else must be equal.
_DISTILLATION = ("kd", "th_kd")


def _weights(arm, row) -> dict:
    return dataclasses.asdict(row_weights(row, arm.params, kd=1.0))


@pytest.mark.parametrize("name", ARMS)
def test_no_test_seed_was_used_for_selection(name):
    for arm in ARMS[name]:
        assert not set(arm.seeds) & SELECTION_SEEDS, arm.name
        assert len(set(arm.seeds)) == len(arm.seeds)


def test_the_full_study_has_the_planned_seeds_rows_and_contrasts():
    fmnist, faces = ARMS["v3"]
    assert fmnist.seeds == tuple(range(100, 130)) and faces.seeds == tuple(range(200, 210))
    assert fmnist.rows == ("kd", "kd+th", "kd-matched", "th-kd/paper")
    assert faces.rows == ("vanilla", "kd", "kd-matched", "kd+th", "sh-kd/th")
    assert [c.primary for c in fmnist.contrasts].count(True) == 1
    assert fmnist.contrasts[0].primary and (fmnist.contrasts[0].row, fmnist.contrasts[0].control) == (
        "kd+th",
        "kd-matched",
    )
    assert fmnist.params == {"T": 2.0, "th_kd": 4.0, "alpha": 0.25}  # v2's chosen values, fixed
    # The large-C arm: more identities than embedding dimensions, a margin head, unclipped students.
    assert "identities=1000" in faces.profile.data and faces.profile.head == "arcface"
    assert faces.profile.student.model_kwargs.get("embed_dim", 128) < 1000
    assert fmnist.profile.student.clip_grad == 0 and faces.profile.student.clip_grad == 0
    assert fmnist.profile.teacher.clip_grad == 5.0  # v2's teacher recipe, the one its values were chosen with
    assert cell_count(ARMS["v3"]) == 2 + 30 * 4 + 10 * 6


@pytest.mark.parametrize("name", ARMS)
def test_every_row_differs_from_its_control_only_by_its_own_term_or_weight(name):
    for arm in ARMS[name]:
        for c in arm.contrasts:
            a, b = _weights(arm, c.row), _weights(arm, c.control)
            changed = {k for k in a if a[k] != b[k]}
            if c.control == "kd-matched":  # the same total distillation weight, moved onto the teacher head
                assert changed == {"kd", "th_kd"}
                assert a["kd"] + a["th_kd"] == b["kd"] + b["th_kd"]
            elif c.row == "th-kd/paper":  # the paper's convex split keeps each total weight
                assert a["ce"] + a["th_ce"] == b["ce"] and a["kd"] + a["th_kd"] == b["kd"]
            elif c.row.startswith("sh-kd/"):  # the same weights; only the teacher (student-aware) differs
                assert changed == set()
            elif c.control == "vanilla":
                assert changed <= {"kd", "T", "T_th"} and a["kd"] > 0
            else:  # kd+th − kd: th_kd added, nothing else
                assert changed == {"th_kd"}


@pytest.mark.parametrize("name", ARMS)
def test_the_matched_control_carries_kd_plus_th_total_distillation_weight(name):
    for arm in ARMS[name]:
        kdth, matched = _weights(arm, "kd+th"), _weights(arm, "kd-matched")
        assert (
            sum(kdth[k] for k in _DISTILLATION) == sum(matched[k] for k in _DISTILLATION) == 1.0 + arm.params["th_kd"]
        )
        assert matched["th_kd"] == 0 and matched["T"] == kdth["T"]


def test_sh_kd_cells_train_their_vanilla_student_and_student_aware_teacher_first():
    faces = ARMS["v3"][1]
    cells = arm_cells(faces, 203)
    assert cells[:2] == [Cell.student("vanilla", 203, {}), Cell("sh-teacher", 203)]
    assert [c.row for c in cells[2:]] == ["kd", "kd-matched", "kd+th", "sh-kd/th"]  # vanilla not trained twice


def test_t_quantiles_holm_and_power_against_references():
    # Student's t table (e.g. Abramowitz & Stegun 26.10) to the digits printed there.
    assert t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    assert t_quantile(0.975, 29) == pytest.approx(2.045230, abs=1e-6)
    assert t_quantile(0.8, 29) == pytest.approx(0.854192, abs=1e-6)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.959964, abs=1e-3)  # tends to the normal quantile
    # Holm by hand: sorted p (0.01, 0.03, 0.04) x (3, 2, 1) = (0.03, 0.06, 0.04) -> monotone (0.03, 0.06, 0.06).
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    # For large n the t quantiles are the normal ones: (1.959964 + 0.841621) * sd / sqrt(n).
    assert detectable_effect(1.0, 100_000) == pytest.approx((1.959964 + 0.841621) / math.sqrt(100_000), rel=1e-3)


def test_contrast_interval_against_numpy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.85, 0.01, 12), rng.normal(0.849, 0.01, 12)
    d = a - b
    half = t_quantile(0.975, 11) * d.std(ddof=1) / np.sqrt(12)
    low, high = paired(list(a), list(b)).ci()
    assert (low, high) == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-12)


@pytest.mark.slow
def test_tiny_v3_runs_every_arm_reports_the_contrasts_and_resumes(tmp_path, fmnist_root, run_cli, one_thread):
    out = tmp_path / "v3"
    argv = ["study", "--profile", "v3-tiny", "--out", str(out), "--fmnist-root", str(fmnist_root), "--workers", "1"]
    code, _, stderr = run_cli(argv)
    assert code == 0, stderr
    arms = build_arms("v3-tiny", str(fmnist_root))
    report = (out / "REPRODUCTION.md").read_text()
    for arm in arms:
        data = collect_arm(out, arm)
        assert all(set(data["rows"][row]) == set(arm.seeds) for row in arm.rows), arm.name
        # The report's primary contrast is the mean per-seed difference of the cells' own numbers.
        c = arm.contrasts[0]
        d = [arm_metric(arm, data["rows"][c.row][s]) - arm_metric(arm, data["rows"][c.control][s]) for s in arm.seeds]
        assert contrast_rows(arm, data["rows"])[0]["mean"] == pytest.approx(100 * np.mean(d), abs=1e-9)
        assert f"## Arm `{arm.name}`" in report and f"**primary** {c.row} − {c.control}" in report
    faces = collect_arm(out, arms[1])["rows"]["kd+th"][200]
    assert faces["verify"]["impostor_pairs"] == 20 and 0.0 <= faces["verify"]["accuracy"] <= 1.0
    assert json.loads((out / "study.json").read_text())["version"] == 3
    code, stdout, _ = run_cli(argv)
    assert code == 0 and "training (" not in stdout and "done earlier, skipped" in stdout
