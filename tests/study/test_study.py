"""``edgekd study`` (study v2): the tiny profile end to end on generated Fashion-MNIST idx files, resume after an
interruption and skipping of finished cells, the gates refusing a too-weak teacher, the rows' weights, and the
paired statistics against hand-computed values."""

import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest

from edgekd.errors import EdgekdError
from edgekd.eval.metrics import combined_prediction
from edgekd.study import build_profile
from edgekd.study.gates import GateError
from edgekd.study.grid import ROWS, Gates, Trainee, cell_folder, paper_alpha, row_weights
from edgekd.study.runner import run_study
from edgekd.study.stats import betainc, flat_gain, mean_std, paired, t_two_sided_p


def _results(out):
    """Every result.json and test.json under ``out`` (minus timings), by relative path."""
    found = {}
    for path in sorted(out.rglob("*.json")):
        if path.name in ("result.json", "test.json"):
            data = json.loads(path.read_text())
            data.pop("train_seconds", None)
            found[str(path.relative_to(out))] = data
    return found


@pytest.mark.slow
def test_tiny_study_runs_every_row_reports_and_resumes(tmp_path, fmnist_root, run_cli, one_thread):
    out = tmp_path / "study"
    argv = ["study", "--profile", "tiny", "--out", str(out), "--fmnist-root", str(fmnist_root), "--device", "cpu"]
    code, stdout, stderr = run_cli(argv)
    assert code == 0, stderr
    profile = build_profile("tiny")
    assert stdout.count(": training") == 21  # teacher; seed 0: 10 (5 sweep cells); seed 1: 8 rows + its I1; 2× vanilla
    gates = json.loads((out / "gates.json").read_text())
    assert gates["ratio"] >= 8 and "gap_points" in gates and "vanilla_flat_gain_points" in gates
    selection = json.loads((out / "selection.json").read_text())
    assert selection["kd"]["param"] == "T" and set(selection["kd"]["scores"]) == {"2", "4"}
    hp = {entry["param"]: entry["chosen"] for entry in selection.values()}
    for seed in range(profile.seeds):
        for row in ROWS:  # every row on every seed, tested once, at the teacher's width, with a val curve
            folder = out / cell_folder(row, seed, hp)
            result = json.loads((folder / "result.json").read_text())
            test = json.loads((folder / "test.json").read_text())
            assert result["key"] == test["key"] and result["seed"] == seed
            assert result["embed_dim"] == 32 and len(result["val_curve"]) == profile.student.epochs
            assert set(test["test"]) >= {"top1", "top1_th"}
            assert ("top1_pprime" in test["test"]) == (row == "th-kd/paper")
            assert result["weights"]["T_th"] == result["weights"]["T"]
            assert not list(folder.rglob("checkpoints"))  # pruned once the cell is done
        # both SH-KD forms of a seed read one student-aware teacher, trained on the seed's vanilla head
        sh_teacher = out / cell_folder("sh-teacher", seed, {}) / "teacher.safetensors"
        for row, stage in (("sh-kd/th", "i2"), ("sh-kd/official", "i2_fresh")):
            stages = out / cell_folder(row, seed, hp) / "sh_kd"
            assert (stages / "i1" / "teacher.safetensors").samefile(sh_teacher)
            assert (stages / stage / "student.safetensors").is_file() and not (stages / "i0").exists()
    # the seed-0 cells chosen on validation are the sweep's own cells (no second training)
    assert (out / cell_folder("kd", 0, hp) / "result.json").is_file()
    unchosen = 2.0 if hp["T"] == 4.0 else 4.0
    assert not (out / cell_folder("kd", 0, {"T": unchosen}) / "test.json").exists()  # tested only when chosen

    report = (out / "REPRODUCTION.md").read_text()
    assert "edgekd study --profile tiny" in report and "Total wall time" in report and "torch" in report
    assert "## Gates" in report and "## Hyper-parameters chosen on validation" in report
    results = report.split("## Results")[1].split("## Convergence")[0]
    for label in (
        "| KD |",
        "| KD+TH |",
        "| TH-KD paper, student head |",
        "| TH-KD paper, p′",
        "| KD+L2E |",
        "| KD+L2E+TH |",
        "| SH-KD, TH form",
        "| SH-KD, fresh head, KD+L2E",
        "| vanilla |",
    ):
        line = next(li for li in results.splitlines() if li.startswith(label))
        assert "±" in line, line
    kd_line = next(li for li in results.splitlines() if li.startswith("| KD+TH |"))
    assert "(p " in kd_line  # a paired difference with its t-test
    for png in ("test.png", "curves.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "cache").exists()  # teacher-embedding caches go once every cell is done
    (out / "REPRODUCTION.md").unlink()
    assert run_cli(["study", "--report-only", "--out", str(out)])[0] == 0
    assert (out / "REPRODUCTION.md").read_text() == report  # re-rendered from the saved results: the same numbers

    before = _results(out)
    code, stdout, stderr = run_cli(argv)  # a rerun trains nothing
    assert code == 0, stderr
    assert ": training" not in stdout and stdout.count("done earlier, skipped") == 21
    assert "0 of 21 cells trained" in stdout
    assert _results(out) == before
    assert len(json.loads((out / "study.json").read_text())["invocations"]) == 2


@pytest.mark.slow
def test_interrupted_study_resumes_to_the_same_numbers(tmp_path, fmnist_root, monkeypatch, one_thread):
    """A study stopped part-way (once between cells, once after a training but before its evaluation) and rerun
    ends with the same results as one uninterrupted run; finished cells are not trained again."""
    import edgekd.study.cells as cells

    profile = replace(build_profile("tiny", seeds=1, fmnist_root=str(fmnist_root)))
    whole = tmp_path / "whole"
    run_study(profile, whole, device="cpu", log=lambda _: None, report=False)

    out = tmp_path / "parts"
    calls = {"n": 0}
    real_curve = cells.val_curve

    def failing_curve(*args, **kwargs):  # the 6th cell dies after training, before its result is written
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_curve(*args, **kwargs)

    monkeypatch.setattr(cells, "val_curve", failing_curve)
    with pytest.raises(KeyboardInterrupt):
        run_study(profile, out, device="cpu", log=lambda _: None, report=False)
    monkeypatch.setattr(cells, "val_curve", real_curve)
    finished = sorted(p.parent for p in out.rglob("result.json"))
    assert len(finished) == 5
    stamps = {p: (p / "result.json").stat().st_mtime_ns for p in finished}

    log: list[str] = []
    run_study(profile, out, device="cpu", log=log.append, report=False)
    assert sum("done earlier, skipped" in line for line in log) == 5
    assert all((p / "result.json").stat().st_mtime_ns == stamps[p] for p in finished)
    assert _results(out) == _results(whole)


def test_capacity_gates_refuse_a_too_weak_teacher(tmp_path, fmnist_root, run_cli, one_thread):
    tiny = build_profile("tiny", fmnist_root=str(fmnist_root))
    # by size, before anything trains: the teacher is the student's architecture
    same = replace(tiny, teacher=replace(tiny.student, model_kwargs=dict(tiny.student.model_kwargs)))
    with pytest.raises(GateError, match=r"capacity gap not met.*1\.0×.*≥ 8×"):
        run_study(same, tmp_path / "size", device="cpu", log=lambda _: None)
    assert not (tmp_path / "size" / "teacher").exists()
    # on validation: the teacher must beat the vanilla student by the margin, or no distilled student trains
    weak = replace(
        tiny,  # lr 1e-9: a teacher that barely moves from its initialization (lr must be > 0)
        teacher=Trainee("cnn_tiny", 1, 1e-9, 32, {"widths": (8, 16, 32), "embed_dim": 32}),
        gates=Gates(min_gap_points=3.0, flat_max_gain_points=100.0),
    )
    out = tmp_path / "gap"
    with pytest.raises(GateError, match="capacity gap not met: the teacher's validation top-1"):
        run_study(weak, out, device="cpu", log=lambda _: None)
    gates = json.loads((out / "gates.json").read_text())
    assert gates["gap_points"] < 3.0
    assert (out / "teacher" / "result.json").is_file() and (out / "seed0" / "vanilla").is_dir()
    assert not (out / "seed0" / "kd").exists()
    assert "stopped by a gate" in (out / "REPRODUCTION.md").read_text()


def test_missing_fashion_mnist_is_one_line_with_the_fix(tmp_path, run_cli):
    code, stdout, stderr = run_cli(
        ["study", "--profile", "tiny", "--out", str(tmp_path / "s"), "--fmnist-root", str(tmp_path / "nowhere")]
    )
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "apt-get install dataset-fashion-mnist" in stderr
    assert not (tmp_path / "s").exists()


def test_rows_differ_from_their_baseline_only_by_their_own_terms():
    hp = {"T": 4.0, "th_kd": 1.0, "alpha": 0.25, "l2e": 10.0}
    w = {row: asdict(row_weights(row, hp, kd=1.0)) for row in ROWS}

    def diff(a, b):
        return {k for k in w[a] if w[a][k] != w[b][k]}

    assert w["vanilla"] == {**w["vanilla"], "ce": 1.0, "kd": 0.0, "th_ce": 0.0, "th_kd": 0.0, "l2e": 0.0}
    assert diff("kd", "vanilla") == {"kd"}
    assert diff("kd+th", "kd") == {"th_kd"} and diff("kd+l2e", "kd") == {"l2e"}
    assert diff("kd+l2e+th", "kd+l2e") == {"th_kd"}
    assert w["sh-kd/th"] == w["kd+l2e+th"] and w["sh-kd/official"] == w["kd+l2e"]  # they differ by the teacher
    assert all(v["T"] == 4.0 and v["T_th"] == 4.0 for k, v in w.items() if k != "vanilla")
    paper = w["th-kd/paper"]  # the paper's convex split of ce and kd, at the same T and KD weight
    assert paper["ce"] == 0.75 and paper["th_ce"] == 0.25 and paper["kd"] == 0.75 and paper["th_kd"] == 0.25
    assert paper_alpha(paper) == pytest.approx(0.25)
    assert asdict(row_weights("th-kd/paper", {**hp, "alpha": 0.0}, kd=1.0)) == w["kd"]  # α = 0 is KD
    with pytest.raises(EdgekdError, match="unknown study row"):
        row_weights("crd", hp, kd=1.0)


def test_profiles():
    full, quick, tiny = build_profile("full"), build_profile("quick"), build_profile("tiny")
    assert full.seeds >= 5 and quick.seeds == 1
    assert full.gates.min_param_ratio >= 8 and full.gates.min_gap_points >= 3 and full.gates.flat_max_gain_points <= 0.3
    assert len(full.sweeps.T) >= 3
    assert build_profile("full", seeds=7).seeds == 7
    assert build_profile("tiny", fmnist_root="/x").data == "fmnist:/x"
    with pytest.raises(EdgekdError, match="unknown study profile"):
        build_profile("huge")
    with pytest.raises(EdgekdError, match="at least 1"):
        build_profile("full", seeds=0)
    assert tiny.train_images < 1000


def test_paired_statistics_against_a_hand_computed_example():
    # d = a − b = (0.02, 0.02, −0.01, 0.03, 0.02): mean 0.016, sample var 0.00092 / 4 = 0.00023,
    # SE = sqrt(0.00023 / 5) = 0.0067823, t = 2.35907 on 4 df.
    a = [0.80, 0.82, 0.79, 0.85, 0.81]
    b = [0.78, 0.80, 0.80, 0.82, 0.79]
    p = paired(a, b)
    assert p.n == 5 and p.df == 4
    # float64 sums of five two-decimal numbers: off the decimal values by a few ulps (~1e-17), far inside approx's
    # default 1e-6 relative
    assert p.mean == pytest.approx(0.016)
    assert p.se == pytest.approx(math.sqrt(0.00023 / 5))
    assert p.t == pytest.approx(0.016 / math.sqrt(0.00023 / 5))
    # Student's t with 4 df in closed form: P(|T| ≥ t) = 1 − sin θ (1 + cos² θ / 2), θ = atan(t / 2)
    theta = math.atan(p.t / 2)
    # the incomplete beta's continued fraction stops at a relative step of 1e-15; the closed form is a few ulps
    assert p.p == pytest.approx(1 - math.sin(theta) * (1 + math.cos(theta) ** 2 / 2), rel=1e-9)
    assert 0.07 < p.p < 0.08
    # tables: the two-sided 5 % and 1 % points of t(4), t(9) and t(30)
    for t, df, level in ((2.776445, 4, 0.05), (4.604095, 4, 0.01), (2.262157, 9, 0.05), (2.042272, 30, 0.05)):
        # the table's t has 7 digits (±5e-7): p moves by |dp/dt|·5e-7 ≲ 1e-6 of p; 1e-5 relative
        assert t_two_sided_p(t, df) == pytest.approx(level, rel=1e-5)
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5)  # Cauchy: 1 − 2·atan(1)/π
    assert t_two_sided_p(0.0, 3) == pytest.approx(1.0)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248)  # I_0.4(2, 3) = 1 − 0.6⁴ − 4·0.4·0.6³
    # degenerate inputs (exact: a zero spread takes p = 0 or 1 by definition, not by arithmetic)
    assert paired([0.5, 0.6], [0.4, 0.5]).p == 0.0 and paired([0.5, 0.6], [0.5, 0.6]).p == 1.0
    assert math.isnan(paired([0.5], [0.4]).se)
    with pytest.raises(ValueError):
        paired([0.5, 0.6], [0.5])
    mean, std = mean_std([0.5, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(math.sqrt(0.02))
    assert math.isnan(mean_std([0.5])[1])
    assert flat_gain([0.1, 0.2, 0.3, 0.35, 0.36], 0.2) == (pytest.approx(0.01), 1)
    assert flat_gain([0.1, 0.2, 0.3, 0.35, 0.36, 0.4, 0.41, 0.5, 0.55, 0.56], 0.2) == (pytest.approx(0.06), 2)


def test_combined_prediction():
    ls = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    lt = np.array([[0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])

    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    # float64 softmaxes of 3 logits by another formula: a few ulps, inside assert_allclose's default rtol 1e-7
    np.testing.assert_allclose(combined_prediction(ls, lt, 0.0), softmax(ls))
    np.testing.assert_allclose(combined_prediction(ls, lt, 1.0), softmax(lt))
    mixed = combined_prediction(ls, lt, 0.25)
    np.testing.assert_allclose(mixed, 0.75 * softmax(ls) + 0.25 * softmax(lt))
    np.testing.assert_allclose(mixed.sum(axis=1), 1.0)
    # p′ can pick a class neither head's argmax alone would weigh the same way
    assert mixed[0].argmax() == 0 and combined_prediction(ls, lt, 0.6)[0].argmax() == 2
    with pytest.raises(EdgekdError):
        combined_prediction(ls, lt, 1.5)
    with pytest.raises(EdgekdError):
        combined_prediction(ls, lt[:, :2], 0.5)
