"""A user's run through the real CLI: --resume restores it, real data gets the field's defaults, config files are
typed, and a run without a terminal logs plain lines and leaves its plots."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

DATA = "synthetic:identities=8,images_per_identity=4,image_size=16,pairs=40,pair_identities=6,pair_images=4"
TINY = ["--data", DATA, "--model", "r_tiny", "--batch-size", "8", "--device", "cpu", "--no-compile", "--workers", "0"]


def settings_of(out):
    return json.loads((out / "settings.json").read_text())["settings"]


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgekd: error:"), err
    assert "Traceback" not in err
    return lines[0]


def test_resume_restores_the_saved_run_and_ends_where_an_uninterrupted_run_ends(tmp_path, run_cli):
    whole, sliced = tmp_path / "whole", tmp_path / "sliced"
    common = ["distill", "--method", "vanilla", *TINY, "--steps", "4", "--no-eval"]
    assert run_cli([*common, "--out", str(whole)])[0] == 0
    code, out, err = run_cli([*common, "--stop-after", "2", "--out", str(sliced)])
    assert code == 0, err
    assert f"edgekd distill --out {sliced} --resume" in out
    assert not (sliced / "student" / "student.safetensors").exists()

    # The command edgekd suggests: no other option, and the run's own settings come back (not the demo's).
    code, out, err = run_cli(["distill", "--out", str(sliced), "--resume"])
    assert code == 0, err
    assert settings_of(sliced)["model"] == "r_tiny" and settings_of(sliced)["method"] == "vanilla"
    # Bit for bit, as the product claims: both runs take their last steps in this process with the same kernels on the
    # same shapes and thread count, from state the checkpoint restores exactly.
    a = load_file(str(whole / "student" / "student.safetensors"))
    b = load_file(str(sliced / "student" / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_an_option_that_changes_the_run(tmp_path, run_cli):
    out = tmp_path / "run"
    argv = [
        "distill",
        "--method",
        "vanilla",
        *TINY,
        "--steps",
        "4",
        "--stop-after",
        "1",
        "--no-eval",
        "--out",
        str(out),
    ]
    assert run_cli(argv)[0] == 0
    for option, value, saved in (("--lr", "0.2", "0.1"), ("--batch-size", "4", "8"), ("--method", "kd", "vanilla")):
        code, _, err = run_cli(["distill", "--out", str(out), "--resume", option, value])
        line = one_line_error(err)
        assert code == 2 and option in line and saved in line and value in line, line
    # Where and how fast it runs may change: a device or checkpoint interval is not the run's meaning.
    code, _, err = run_cli(["distill", "--out", str(out), "--resume", "--checkpoint-every", "3", "--device", "cpu"])
    assert code == 0, err


def test_resume_without_a_run_and_a_second_run_into_the_same_folder_are_one_line_errors(tmp_path, run_cli):
    code, _, err = run_cli(["distill", "--out", str(tmp_path / "nothing"), "--resume"])
    assert code == 2 and "holds no edgekd run" in one_line_error(err)
    assert not (tmp_path / "nothing").exists()
    out = tmp_path / "run"
    assert run_cli(["teacher", *TINY, "--steps", "1", "--out", str(out)])[0] == 0
    code, _, err = run_cli(["teacher", *TINY, "--steps", "1", "--out", str(out)])
    assert code == 2 and "--resume" in one_line_error(err)
    code, _, err = run_cli(["distill", "--out", str(out), "--resume"])
    assert code == 2 and "edgekd teacher --out" in one_line_error(err)


def _image_folder(root, classes=4, per_class=33, size=16):
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"id{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"id{c}" / f"{i}.png")
    return root


def test_real_data_gets_face_defaults_and_only_the_demo_gets_demo_values(tmp_path, run_cli):
    folder = _image_folder(tmp_path / "faces")
    out = tmp_path / "run"
    argv = ["teacher", "--data", str(folder), "--model", "r_tiny", "--steps", "1", "--device", "cpu", "--no-compile"]
    code, _, err = run_cli([*argv, "--batch-size", "256", "--out", str(out)])
    assert code == 2 and "or less (with --nproc N" in one_line_error(err) and not out.exists()
    code, stdout, err = run_cli([*argv, "--out", str(out)])
    assert code == 0, err
    saved = settings_of(out)
    assert (saved["scale"], saved["margin"], saved["epochs"], saved["warmup_steps"]) == (64.0, 0.5, 20.0, 0)
    assert saved["batch_size"] == 128 and saved["head"] == "arcface"
    assert stdout.startswith("settings: ") and "scale=64.0" in stdout and "margin=0.5" in stdout

    from edgekd.cli.options import DEMO

    code, text, _ = run_cli(["distill", "--help"])
    assert code == 0
    flat = " ".join(text.split())
    assert f"[default: 64.0; demo: {DEMO['scale']}]" in flat and f"[default: 20.0; demo: {DEMO['epochs']}]" in flat
    assert "[default: 0.5 ArcFace, 0.4 CosFace" in flat


def test_config_files_are_typed_like_the_command_line(tmp_path, run_cli):
    config = tmp_path / "run.yaml"
    config.write_text(f"data: '{DATA}'\nmodel: r_tiny\nlr: 1e-3\nbatch_size: 8\nsteps: 1\ndevice: cpu\ncompile: no\n")
    out = tmp_path / "ok"
    code, _, err = run_cli(["teacher", "--config", str(config), "--out", str(out)])
    assert code == 0, err
    assert settings_of(out)["lr"] == pytest.approx(1e-3) and isinstance(settings_of(out)["lr"], float)

    for text, key in (
        ("batch_size: sixty\n", "batch_size"),
        ("lr: -0.1\n", "lr"),
        ("steps: 1.5\n", "steps"),
        ("device: gpu\n", "device"),
        ("colour: red\n", "colour"),
    ):
        config.write_text(text)
        code, _, err = run_cli(["teacher", "--config", str(config), "--out", str(tmp_path / "bad")])
        assert code == 2 and key in one_line_error(err)
        assert not (tmp_path / "bad").exists()


def test_without_a_terminal_a_run_logs_plain_lines_and_writes_its_plots(tmp_path, run_cli):
    out = tmp_path / "run"
    argv = ["distill", "--method", "kd", *TINY, "--steps", "3", "--teacher-model", "r_tiny", "--teacher-epochs", "1"]
    code, stdout, err = run_cli([*argv, "--out", str(out)])
    assert code == 0, err
    progress = [line for line in stdout.splitlines() if line.startswith("kd: ")]
    assert progress[0].startswith("kd: 0/3 step") and progress[-1].startswith("kd: 3/3 step (100%)")
    assert "loss " in progress[-1] and "lr " in progress[-1] and "img_s " in progress[-1]
    assert "teacher: trained r_tiny (1 epoch)" in stdout
    for name in ("loss.png", "roc.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same teacher settings and data again: the cached teacher is reused, and the log says so.
    code, stdout, err = run_cli([*argv, "--out", str(tmp_path / "again")])
    assert code == 0, err
    assert "teacher: reusing the cached r_tiny" in stdout


def test_teacher_fine_tunes_a_plain_arcface_torch_backbone_with_a_new_head(tmp_path, run_cli):
    from edgekd.bundle import load_bundle
    from edgekd.models import create_model

    backbone = create_model("r_tiny")  # 112x112, as arcface_torch trains
    torch.save(backbone.state_dict(), tmp_path / "model.pt")  # arcface_torch's model.pt: backbone keys, no head
    out = tmp_path / "teacher"
    data = "synthetic:identities=8,images_per_identity=2,image_size=112"
    argv = ["teacher", *TINY, "--data", data, "--init", str(tmp_path / "model.pt"), "--steps", "1", "--lr", "1e-9"]
    argv += ["--out", str(out)]
    code, _, err = run_cli(argv)
    assert code == 0, err
    teacher = load_bundle(out / "teacher.safetensors")
    assert teacher.head is not None and teacher.head.num_classes == 8
    # lr 1e-9: the weights are the ones loaded, not a fresh random draw (BatchNorm statistics do move in training).
    trained = dict(teacher.backbone.named_parameters())
    # One step moves a weight by lr·|update| ≲ 1e-9·5 (the clipped gradient) plus one float32 rounding of the weight,
    # ≤ 2⁻²⁴·|w| (under 1e-6 for |w| < 16); a fresh random draw would move them by ~0.1.
    moved = max((trained[k] - v).abs().max().item() for k, v in backbone.named_parameters())
    assert moved < 1e-6


def test_a_teacher_trained_with_another_head_spec_is_refused_not_rescored(tmp_path, run_cli):
    teacher = tmp_path / "teacher"
    assert run_cli(["teacher", *TINY, "--steps", "1", "--scale", "32", "--out", str(teacher)])[0] == 0
    out = tmp_path / "student"
    argv = ["distill", *TINY, "--steps", "1", "--teacher", str(teacher / "teacher.safetensors"), "--scale", "16"]
    code, _, err = run_cli([*argv, "--method", "kd", "--out", str(out)])
    line = one_line_error(err)
    assert code == 2 and "s=32" in line and "s=16" in line and "--scale 32" in line and not out.exists()
    # With the teacher's spec it trains; vanilla reads no teacher logits, so its spec does not matter there.
    assert run_cli([*argv[:-1], "32", "--method", "kd", "--no-eval", "--out", str(tmp_path / "ok")])[0] == 0


def test_the_settings_line_names_the_given_teachers_architecture_not_the_default_one(tmp_path, run_cli):
    """A teacher file decides its own architecture; --teacher-epochs / --teacher-lr do not apply to it (issue 25)."""
    teacher = tmp_path / "teacher"
    assert run_cli(["teacher", *TINY, "--steps", "1", "--model", "r_tiny", "--out", str(teacher)])[0] == 0
    argv = ["distill", *TINY, "--steps", "1", "--teacher", str(teacher / "teacher.safetensors"), "--method", "kd"]
    code, stdout, err = run_cli([*argv, "--teacher-model", "r50", "--no-eval", "--out", str(tmp_path / "s")])
    settings = next(line for line in stdout.splitlines() if line.startswith("settings: "))
    assert code == 0 and "teacher_model=r_tiny" in settings.split(), (err, settings)
    assert "teacher_epochs=" not in settings and "teacher_lr=" not in settings


def test_sh_kd_final_student_uses_the_runs_seed_like_every_other_method(tmp_path, run_cli):
    out = tmp_path / "shkd"
    argv = ["distill", *TINY, "--method", "sh-kd", "--steps", "1", "--seed", "7", "--teacher-model", "r_tiny"]
    code, _, err = run_cli([*argv, "--teacher-epochs", "1", "--no-eval", "--out", str(out)])
    assert code == 0, err
    for stage in ("i0", "i2"):
        (state,) = (out / "sh_kd" / stage / "checkpoints").glob("step_*/state.json")
        assert json.loads(state.read_text())["config"]["seed"] == 7, stage


def test_sh_kd_with_the_vanilla_baseline_trains_the_vanilla_student_once_as_its_i0(tmp_path, run_cli):
    """I0 is a plain student of the run's settings, seed and data: the cached vanilla student is that model."""
    out = tmp_path / "shkd"
    argv = ["distill", *TINY, "--method", "sh-kd", "--steps", "1", "--teacher-model", "r_tiny", "--teacher-epochs", "1"]
    code, stdout, err = run_cli([*argv, "--vanilla-baseline", "--out", str(out)])
    assert code == 0, err
    assert stdout.count("vanilla student: trained r_tiny") == 1 and "reusing the cached" not in stdout
    assert not (out / "sh_kd" / "i0").exists() and (out / "sh_kd" / "i2" / "student.safetensors").is_file()
    report = json.loads((out / "results.json").read_text())
    assert [row["role"] for row in report["results"]] == ["teacher", "vanilla", "student"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _pairs_bin(path, size=16):
    from edgekd.data.verification_bin import write_bin

    images = torch.randint(0, 256, (40, 3, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    return write_bin(path, images, [i % 2 == 0 for i in range(20)])


def test_settings_store_absolute_paths_so_a_run_resumes_from_any_directory(tmp_path, run_cli, monkeypatch):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _image_folder(start / "faces", per_class=4)
    _pairs_bin(start / "lfw.bin")
    monkeypatch.chdir(start)
    fast = ["--model", "r_tiny", "--batch-size", "8", "--device", "cpu", "--no-compile", "--workers", "0"]
    assert run_cli(["teacher", "--data", "faces", *fast, "--steps", "1", "--out", "teacher"])[0] == 0
    argv = ["distill", "--data", "faces", "--teacher", "teacher/teacher.safetensors", "--pairs", "lfw.bin",
            "--method", "kd", *fast, "--steps", "2", "--stop-after", "1", "--out", "run"]  # fmt: skip
    code, _, err = run_cli(argv)
    assert code == 0, err
    saved = settings_of(start / "run")
    for key, path in (("data", "faces"), ("teacher", "teacher/teacher.safetensors"), ("pairs", "lfw.bin")):
        assert saved[key] == str(start / path), (key, saved[key])
    assert settings_of(start / "teacher")["data"] == str(start / "faces")

    # A scheduler starts the job in another folder: the saved paths still name the run's files.
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(["distill", "--out", str(start / "run"), "--resume"])
    assert code == 0, err
    assert (start / "run" / "student" / "student.safetensors").is_file()
    code, text, _ = run_cli(["distill", "--help"])
    assert "absolute" in " ".join(text.split())


def test_an_old_settings_file_with_relative_paths_resumes_from_its_own_directory(tmp_path, run_cli, monkeypatch):
    """settings.json files written before paths were stored absolute keep working where they were started."""
    _image_folder(tmp_path / "faces", per_class=4)
    monkeypatch.chdir(tmp_path)
    argv = ["distill", "--data", "faces", "--model", "r_tiny", "--method", "vanilla", "--batch-size", "8",
            "--device", "cpu", "--no-compile", "--workers", "0", "--steps", "2", "--stop-after", "1", "--no-eval",
            "--out", "run"]  # fmt: skip
    assert run_cli(argv)[0] == 0
    path = tmp_path / "run" / "settings.json"
    old = json.loads(path.read_text())
    old["settings"].update(data="faces", out="run")  # as an older edgekd wrote them: as typed
    path.write_text(json.dumps(old))
    # The same data named again on the command line, relative or absolute, is the same data: not a change.
    code, _, err = run_cli(["distill", "--out", "run", "--resume", "--data", "faces", "--stop-after", "1"])
    assert code == 0, err
    code, _, err = run_cli(["distill", "--out", "run", "--resume", "--data", str(tmp_path / "faces")])
    assert code == 0, err
    assert (tmp_path / "run" / "student" / "student.safetensors").is_file()
