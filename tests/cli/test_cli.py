"""The command line end to end on tiny settings, and its one-line errors for bad input."""

import json
from datetime import datetime

import pytest
import torch

from edgekd.cli import main

DATA = "synthetic:identities=8,images_per_identity=8,pairs=40,pair_identities=6,pair_images=4"
TINY = [
    "--data",
    DATA,
    "--image-size",
    "32",
    "--model",
    "mbf_tiny",
    "--batch-size",
    "16",
    "--no-compile",
    "--device",
    "cpu",
    "--checkpoint-every",
    "2",
]


def one_line_error(run_cli, argv, *fragments):
    code, _, err = run_cli(argv)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgekd: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_help_lists_every_command(run_cli):
    code, out, _ = run_cli(["--help"])
    assert code == 0
    for name in ("teacher", "distill", "eval", "export", "benchmark-latency"):
        assert name in out
    code, out, _ = run_cli(["distill", "--help"])
    assert code == 0 and "--method" in out and "th-kd" in out and "--loss-backend" in out


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A tiny TH-KD run through the CLI: trains the default teacher, distills, evaluates."""
    out = tmp_path_factory.mktemp("distill")
    main_args = [
        "distill",
        *TINY,
        "--steps",
        "4",
        "--teacher-model",
        "r_tiny",
        "--teacher-epochs",
        "1",
        "--out",
        str(out),
    ]
    try:
        main(main_args)
    except SystemExit as exc:  # main only exits on errors
        raise AssertionError(f"distill exited {exc.code}") from None
    return out


def test_distill_writes_student_and_comparison(distilled):
    report = json.loads((distilled / "results.json").read_text())
    assert report["method"] == "th-kd"
    assert [row["role"] for row in report["results"]] == ["teacher", "student"]
    for row in report["results"]:
        assert row["acc_ci"][0] <= row["acc"] <= row["acc_ci"][1]
        assert row["impostor_pairs"] == 20 and "tar@0.001" not in row and "tar@0.1" not in row  # 20 resolve no FAR
    assert (distilled / "student" / "student.safetensors").is_file()
    lines = (distilled / "student" / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert {"step", "time", "loss", "lr", "images_per_s", "ce", "th_ce"} <= set(last)
    assert datetime.fromisoformat(last["time"]).tzinfo is not None  # UTC wall-clock time of the logged step


def test_eval_reports_accuracy_and_roc(distilled, tmp_path, run_cli):
    code, out, err = run_cli(
        [
            "eval",
            str(distilled / "student" / "student.safetensors"),
            "--pairs",
            "synthetic:pairs=40,pair_identities=6,pair_images=4,image_size=32",
            "--out",
            str(tmp_path),
        ],
    )
    assert code == 0, err
    assert "accuracy" in out and "TAR@FAR" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert (tmp_path / "roc.png").stat().st_size > 0
    assert set(report) >= {"model", "roc_plot"}


def test_teacher_with_student_head_keeps_it_frozen(distilled, tmp_path, run_cli):
    student = distilled / "student" / "student.safetensors"
    code, out, err = run_cli(
        ["teacher", *TINY, "--model", "r_tiny", "--steps", "2", "--student-head", str(student), "--out", str(tmp_path)],
    )
    assert code == 0, err
    from edgekd.bundle import load_bundle

    teacher, source = load_bundle(tmp_path / "teacher.safetensors"), load_bundle(student)
    assert torch.equal(teacher.head.weight, source.head.weight)  # frozen, saved and loaded: a copy, exact
    assert teacher.meta["student_aware"] is True


def test_sh_kd_runs_three_stages_and_restarts_from_a_stage(tmp_path, run_cli):
    argv = [
        "distill",
        *TINY,
        "--method",
        "sh-kd",
        "--steps",
        "2",
        "--teacher-model",
        "r_tiny",
        "--teacher-epochs",
        "0.25",
        "--no-eval",
        "--out",
        str(tmp_path),
    ]
    code, _, err = run_cli(argv)
    assert code == 0, err
    stages = tmp_path / "sh_kd"
    finals = {
        "i0": stages / "i0" / "student.safetensors",
        "i1": stages / "i1" / "teacher.safetensors",
        "i2": stages / "i2" / "student.safetensors",
    }
    assert all(p.is_file() for p in finals.values())
    stamps = {k: p.stat().st_mtime_ns for k, p in finals.items()}
    import shutil

    shutil.rmtree(stages / "i2")  # rerun only the last stage
    code, _, err = run_cli(argv + ["--resume"])
    assert code == 0, err
    assert finals["i0"].stat().st_mtime_ns == stamps["i0"] and finals["i1"].stat().st_mtime_ns == stamps["i1"]
    assert finals["i2"].is_file()
    from edgekd.bundle import load_bundle

    i0, i1, i2 = (load_bundle(finals[k]) for k in ("i0", "i1", "i2"))
    assert torch.equal(i1.head.weight, i0.head.weight)  # the teacher trained on the frozen θ_s


def test_bad_input_is_one_line(tmp_path, run_cli):
    one_line_error(run_cli, ["distill", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o1")], "missing")
    (tmp_path / "empty").mkdir()
    one_line_error(run_cli, ["distill", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")])
    one_line_error(run_cli, ["distill", *TINY, "--model", "nope", "--out", str(tmp_path / "o3")], "nope")
    one_line_error(
        run_cli,
        ["distill", *TINY, "--teacher", str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "o4")],
        "does not exist",
    )
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    one_line_error(run_cli, ["eval", str(tmp_path / "bad.safetensors")], "bad.safetensors")
    (tmp_path / "cfg.yaml").write_text("learning_rate: 0.1\n")
    one_line_error(
        run_cli, ["distill", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "o5")], "learning_rate"
    )
    code, _, err = run_cli(["distill", "--method", "magic"])
    assert code == 2 and "magic" in err


def test_teacher_for_other_data_is_rejected(distilled, tmp_path, run_cli):
    other = "synthetic:identities=6,images_per_identity=8,pairs=40"
    # The fixture's own teacher (the default one, in the edgekd cache), as its report names it.
    teacher = json.loads((distilled / "results.json").read_text())["teacher"]
    args = ["distill", *TINY, "--data", other, "--teacher", str(teacher), "--steps", "2", "--out", str(tmp_path)]
    one_line_error(run_cli, args, "classes")


def test_nan_loss_is_one_line_and_keeps_checkpoint(tmp_path, run_cli):
    line = one_line_error(
        run_cli,
        [
            "distill",
            *TINY,
            "--method",
            "vanilla",
            "--head",
            "linear",
            "--lr",
            "1e9",
            "--clip-grad",
            "0",
            "--checkpoint-every",
            "1",
            "--steps",
            "60",
            "--out",
            str(tmp_path),
        ],
        "loss became",
    )
    assert "step_" in line


def test_config_file_values_apply_and_command_line_wins(tmp_path, run_cli):
    (tmp_path / "run.toml").write_text(
        f'method = "vanilla"\nmodel = "mbf_tiny"\ndata = "{DATA}"\nimage_size = 32\nbatch_size = 16\n'
        'steps = 2\ncompile = false\ndevice = "cpu"\neval = false\n'
    )
    code, _, err = run_cli(["distill", "--config", str(tmp_path / "run.toml"), "--steps", "3", "--out", str(tmp_path)])
    assert code == 0, err
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["method"] == "vanilla" and report["config"]["model"] == "mbf_tiny"
    assert report["config"]["steps"] == 3 and "results" not in report
