"""Verification during training (``--eval-every``, arcface_torch's callback): the scores land in metrics.jsonl at the
asked steps, equal what ``edgekd eval`` gives for the kept best backbone, and a run without pair sets is refused
before it writes anything."""

from __future__ import annotations

import json

from edgekd.bundle import load_bundle
from edgekd.data import create_pairs
from edgekd.eval.report import verify_bundle

DATA = "synthetic:identities=8,images_per_identity=4,image_size=16,pairs=40,pair_identities=8"
BASE = ["--data", DATA, "--model", "r_tiny", "--batch-size", "8", "--steps", "6", "--device", "cpu", "--no-compile"]


def test_scores_are_logged_and_the_best_backbone_is_kept(tmp_path, run_cli):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["distill", *BASE, "--method", "vanilla", "--eval-every", "2", "--out", str(out)])
    assert code in (0, None), err
    lines = [json.loads(line) for line in (out / "student" / "metrics.jsonl").read_text().splitlines()]
    scored = [line for line in lines if "verify" in line]
    assert [line["step"] for line in scored] == [2, 4, 6]
    best = json.loads((out / "student" / "best.json").read_text())
    assert best["mean_accuracy"] == max(line["verify_mean"] for line in scored)
    # The kept backbone is the one scored at that step: edgekd eval's own path gives the same accuracy.
    kept = load_bundle(out / "student" / "best.safetensors")
    assert kept.head is None and kept.meta["step"] == best["step"]
    again = verify_bundle(kept, create_pairs(DATA), device="cpu")["accuracy"]
    assert again == best["mean_accuracy"]  # one pair set: its accuracy is the mean; same module, same inputs
    assert (out / "loss.png").is_file()  # the loss plot skips the verification lines


def test_teacher_runs_verify_on_their_data_s_pairs(tmp_path, run_cli):
    out = tmp_path / "teacher"
    code, _, err = run_cli(["teacher", *BASE, "--eval-every", "3", "--out", str(out)])
    assert code in (0, None), err
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "verify" in line] == [3, 6]  # fmt: skip
    assert (out / "best.safetensors").is_file()


def test_eval_every_without_pairs_is_refused_before_anything_is_written(tmp_path, run_cli):
    out = tmp_path / "run"
    code, _, err = run_cli(["distill", *BASE, "--method", "vanilla", "--eval-every", "2", "--no-eval", "--out",
                            str(out)])  # fmt: skip
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--eval-every 2 needs verification pairs" in lines[0], err
    assert not out.exists()
