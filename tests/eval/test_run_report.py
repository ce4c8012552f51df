"""A run that explains itself (issue 25): ``edgekd distill`` ends with OUT/report.md and OUT/report.html holding the
run's settings, final losses, verification table, ROC with AUC and EER, and the export gates and latency found in the
folder. AUC and EER are checked against hand computations; the report against the run's own JSON outputs."""

import base64
import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd.bundle import load_bundle
from edgekd.data import create_pairs
from edgekd.distill.run_report import update_run_report, write_run_report
from edgekd.errors import EdgekdError, EdgekdWarning
from edgekd.eval.embed import embed_images
from edgekd.eval.metrics import equal_error_rate, roc_auc, roc_curve
from tests.tiny_runs import DATA, DISTILL, TINY, edgekd


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny KD run (a 4-step r_tiny teacher trained for it, a 2-step r_tiny student) and its report; what it
    printed is kept beside it, in ``stdout.txt``."""
    root = tmp_path_factory.mktemp("report")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("EDGEKD_CACHE_DIR", str(root / "cache"))
        torch.manual_seed(0)
        assert edgekd([*DISTILL, "--out", str(root / "run")]) == 0
    (root / "stdout.txt").write_text(printed.getvalue())
    return root / "run"


def _json(path):
    return json.loads(path.read_text())


def _last_loss_line(metrics_path) -> dict:
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if '"loss"' in line][-1]


def _pct_ci(value, ci) -> str:
    return f"{100 * value:.2f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


# -- AUC and EER ------------------------------------------------------------------------------------------------


def test_auc_and_eer_of_sklearns_docstring_example_by_hand():
    # sklearn.metrics.roc_auc_score's example: y = [0, 0, 1, 1], scores [0.1, 0.4, 0.35, 0.8] -> 0.75 (3 of the 4
    # genuine-impostor pairs ordered right). At threshold 0.4 one impostor of two is accepted and one genuine pair of
    # two rejected: FAR = FRR = 0.5, a point of the curve, so the EER is 0.5.
    fpr, tpr, _ = roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True]))
    assert roc_auc(fpr, tpr) == pytest.approx(0.75)
    assert equal_error_rate(fpr, tpr) == pytest.approx(0.5)


def test_auc_counts_a_tie_half_and_eer_crosses_between_points():
    # genuine 0.9, 0.5; impostor 0.5, 0.1. Pairs: 0.9 beats both (2), 0.5 ties 0.5 (1/2) and beats 0.1 (1): 3.5 / 4.
    # The curve (0, 0) -> (0, 1/2) -> (1/2, 1) -> (1, 1) meets FAR = 1 - TAR halfway along its middle segment, at
    # FAR = 1/4 (the tie accepted with probability one half).
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    fpr, tpr, _ = roc_curve(scores, np.array([True, True, False, False]))
    assert roc_auc(fpr, tpr) == pytest.approx(0.875)
    assert equal_error_rate(fpr, tpr) == pytest.approx(0.25)


def test_auc_is_the_mann_whitney_statistic_and_eer_lies_between_its_operating_points():
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.4
    scores = np.round(rng.normal(labels * 1.0, 1.0), 1)  # rounded: many ties
    gen, imp = scores[labels], scores[~labels]
    expected = (np.greater.outer(gen, imp).sum() + 0.5 * np.equal.outer(gen, imp).sum()) / (len(gen) * len(imp))
    for drop in (True, False):
        fpr, tpr, _ = roc_curve(scores, labels, drop_intermediate=drop)
        assert roc_auc(fpr, tpr) == pytest.approx(expected, abs=1e-12)
    eer = equal_error_rate(*roc_curve(scores, labels)[:2])
    # Accepting scores >= t: the last threshold with FAR <= FRR and the next one bracket the crossing.
    thresholds = np.unique(scores)[::-1]
    far = np.array([(imp >= t).mean() for t in thresholds])
    frr = np.array([(gen < t).mean() for t in thresholds])
    i = np.flatnonzero(far <= frr)[-1]
    assert far[i] <= eer <= far[i + 1] and frr[i + 1] <= eer <= frr[i]


def test_auc_of_a_curve_without_impostors_is_a_one_line_error():
    fpr, tpr, _ = roc_curve(np.array([0.2, 0.7]), np.array([True, True]))
    with pytest.raises(EdgekdError, match="all genuine or all impostor"):
        roc_auc(fpr, tpr)


# -- the report of a run -----------------------------------------------------------------------------------------


def test_the_report_holds_the_runs_settings_and_final_losses(run):
    md = (run / "report.md").read_text()
    settings = _json(run / "settings.json")["settings"]
    for key, value in settings.items():
        if value is not None:
            shown = json.dumps(value) if isinstance(value, dict | list) else str(value)
            assert f"| {key} | {shown} |" in md, key
    results = _json(run / "results.json")
    student = _last_loss_line(run / "student" / "metrics.jsonl")
    teacher = _last_loss_line(Path(results["teacher"]).parent / "metrics.jsonl")  # the cached teacher's own log
    for name, line in (("student", student), ("teacher", teacher)):
        row = next(r for r in md.splitlines() if r.startswith(f"| {name} | {line['step']} |"))
        for term in ("loss", "ce", "kd"):
            if term in line:
                assert f"| {line[term]:.6g} |" in row, (term, row)
    assert set(student) >= {"ce", "kd"}
    assert "![Training losses by step](loss.png)" in md


def test_the_report_holds_the_verification_table_with_intervals_and_names_the_pair_set(run):
    md, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    rows = _json(run / "results.json")["results"]
    assert [r["role"] for r in rows] == ["teacher", "student"]
    for row in rows:
        assert row["tar_ci"], "the pair set should resolve a FAR"
        expected = [_pct_ci(row["acc"], row["acc_ci"])]
        expected += [_pct_ci(row[key], ci) for key, ci in row["tar_ci"].items()]
        for text in expected:
            assert text in md and text in page, text
    assert f"Pair sets: synthetic ({rows[0]['impostor_pairs']} impostor pairs)." in md


def test_auc_and_eer_in_the_report_are_the_students_own(run):
    # Independently of the run's evaluation: embed the pair images with the saved student, score the pairs by cosine,
    # count genuine-over-impostor orderings (Mann-Whitney) for the AUC, and bracket the EER by operating points.
    bundle = load_bundle(run / "student" / "student.safetensors")
    pairs = create_pairs(DATA, image_size=16)
    emb = embed_images(bundle.backbone.eval(), pairs.images, flip=True, mean=bundle.cfg.mean, std=bundle.cfg.std)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    scores = np.einsum("ij,ij->i", emb[0::2], emb[1::2])
    same = np.asarray(pairs.issame, dtype=bool)
    gen, imp = scores[same], scores[~same]
    auc = (np.greater.outer(gen, imp).sum() + 0.5 * np.equal.outer(gen, imp).sum()) / (len(gen) * len(imp))

    measures = {m["role"]: m for m in _json(run / "report.json")["roc"]}
    assert measures["student"]["pairs"] == "synthetic" and measures["student"]["curve"] == "student (r_tiny)"
    assert measures["student"]["auc"] == pytest.approx(auc, abs=2e-3)  # float rounding of near-tied scores only
    assert abs(measures["teacher"]["auc"] - auc) > 5e-3  # the teacher's row is another model's
    far = np.array([(imp >= t).mean() for t in np.sort(scores)[::-1]])
    frr = np.array([(gen < t).mean() for t in np.sort(scores)[::-1]])
    one = 1 / len(imp)  # a near tie may order one pair differently than the run's embedding did
    assert far[far <= frr].max() - one <= measures["student"]["eer"] <= far[far > frr].min() + one
    md = (run / "report.md").read_text()
    m = measures["student"]
    assert f"| synthetic | student (r_tiny) | {m['auc']:.4f} | {100 * m['eer']:.2f} |" in md


def test_distills_last_line_points_at_the_report(run):
    last = (run.parent / "stdout.txt").read_text().strip().splitlines()[-1]
    student = _json(run / "results.json")["student"]
    assert last.startswith(f"student: {student}  (") and f"; report {run / 'report.html'};" in last, last
    assert (run / "report.html").is_file()


def test_the_html_report_stands_alone(run):
    page = (run / "report.html").read_text()
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page), "the page links to a file or the network"
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(i) for i in images] == [(run / name).read_bytes() for name in ("loss.png", "roc.png")]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


GATE = ["--gate-images", "8", "--gate-batches", "1,4", "--pairs", DATA]
TIMING = ["--backend", "ort-cpu", "--batch", "1", "--iters", "3", "--warmup", "1", "--min-seconds", "0"]


@pytest.mark.slow
def test_an_export_and_a_latency_result_written_into_the_run_join_its_report(run, tmp_path, run_cli):
    again = tmp_path / "run"
    shutil.copytree(run, again)
    # The export's default output: beside the student, two folders below the run (SH-KD's last stage is three).
    code, stdout, err = run_cli(["export", str(again / "student" / "student.safetensors"), *GATE])
    assert code == 0, err
    onnx = again / "student" / "student.fp32.onnx"
    assert stdout.splitlines()[-1] == f"run report updated: {again / 'report.html'}"
    assert "student.fp32.onnx (onnx, fp32): gates passed" in (again / "report.md").read_text()
    code, stdout, err = run_cli(["benchmark-latency", str(onnx), *TIMING, "--json", str(again / "latency.json")])
    assert code == 0, err
    assert stdout.splitlines()[-1] == f"run report updated: {again / 'report.html'}"

    md, page = (again / "report.md").read_text(), (again / "report.html").read_text()
    sidecar = _json(again / "student" / "student.fp32.onnx.json")
    assert sidecar["gate"]["passed"]
    assert "student.fp32.onnx (onnx, fp32): gates passed (student/student.fp32.onnx.json)" in md
    for key, value in sidecar["gate"]["task"]["candidate"].items():
        assert re.search(rf"{re.escape(key)}\s+[\d.]+\s+{value:.2f}", md), key
    worst = min(row["min_cos"] for row in sidecar["gate"]["rows"])
    assert f"{worst:.7f}" in md
    latency = _json(again / "latency.json")["results"][0]
    assert re.search(rf"ort-cpu\s+fp32\s+1\s+{latency['iters']}\s+{latency['latency_ms']['median']:.3f}", md)
    assert page.count("data:image/png;base64,") == 3  # loss, ROC and the latency plot
    # What only the end of the run knew is kept: the AUC and EER, and the table it printed.
    assert _json(again / "report.json")["roc"] == _json(run / "report.json")["roc"]
    assert _json(run / "report.json")["table"] in md


@pytest.mark.slow
def test_outputs_outside_a_finished_run_leave_reports_alone(run, tmp_path, run_cli):
    # Beside a checkpoint outside any run, and in a run folder that has no report yet (a run still training).
    shutil.copy(run / "student" / "student.safetensors", tmp_path / "student.safetensors")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run / "settings.json", unfinished / "settings.json")
    code, stdout, err = run_cli(["export", str(tmp_path / "student.safetensors"), *GATE])
    assert code == 0, err
    onnx = tmp_path / "student.fp32.onnx"
    for where in (tmp_path, unfinished):
        code, stdout, err = run_cli(["benchmark-latency", str(onnx), *TIMING, "--json", str(where / "latency.json")])
        assert code == 0, err
        assert "run report" not in stdout
    assert not list(tmp_path.rglob("report.*"))


def test_a_killed_runs_cut_line_is_skipped_and_a_damaged_line_named(run, tmp_path, run_cli, one_line):
    killed = tmp_path / "killed"
    shutil.copytree(run, killed)
    metrics = killed / "student" / "metrics.jsonl"
    logged = metrics.read_text()
    metrics.write_text(logged + '{"step": 3, "time": "2026-01')  # the line a kill cut short
    write_run_report(killed)
    assert _json(killed / "report.json")["losses"] == _json(run / "report.json")["losses"]
    code, _, err = run_cli(["compare", str(run), str(killed)])
    assert code == 0, err
    metrics.write_text('{"step": 1, "lo\n' + logged)  # damage no kill makes: a line cut short before others
    code, _, err = run_cli(["compare", str(run), str(killed)])
    one_line(code, err, f"{metrics}, line 1:", "mend or delete that line")


def test_a_report_that_cannot_be_written_again_is_a_warning_not_the_outputs_failure(run, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    metrics = damaged / "student" / "metrics.jsonl"
    metrics.write_text("not json\n" + metrics.read_text())
    with pytest.warns(EdgekdWarning, match=rf"run report of {re.escape(str(damaged))} was not updated: .*line 1:"):
        update_run_report(damaged / "student" / "student.fp32.onnx", print)
    assert "run report updated" not in capsys.readouterr().out


def test_a_teacher_run_reports_its_losses_and_the_model_eval_every_kept(tmp_path, run_cli):
    out = tmp_path / "teacher"
    code, stdout, err = run_cli(["teacher", *TINY, "--steps", "2", "--eval-every", "1", "--out", str(out)])
    assert code == 0, err
    assert f"run report: {out / 'report.html'}" in stdout
    md = (out / "report.md").read_text()
    line = _last_loss_line(out / "metrics.jsonl")
    assert f"| teacher | {line['step']} | {line['loss']:.6g} | {line['ce']:.6g} |" in md
    best = _json(out / "best.json")
    accuracy = ", ".join(f"{name} {100 * value:.2f} %" for name, value in best["accuracy"].items())
    assert f"step {best['step']}, {accuracy}" in md
    # A teacher run draws no loss plot of its own; its report does, and inlines it.
    page = (out / "report.html").read_text()
    assert (
        base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', page)[1]) == (out / "loss.png").read_bytes()
    )
