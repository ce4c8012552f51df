"""Bad input to the training commands: exit 2, one line on stderr naming the problem, no traceback, nothing written.

Each case runs the real CLI (``edgekd.cli.main``) before any training could start; the run folder must not exist
afterwards, so a mistake never leaves a half-made run behind.
"""

import pytest

DATA = "synthetic:identities=16,images_per_identity=4,image_size=16"
T = ["--data", DATA, "--model", "r_tiny", "--batch-size", "8", "--steps", "2", "--device", "cpu", "--no-compile"]

# (extra arguments, text the error line must contain)
CASES = [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-8"], "--batch-size"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--lr", "-0.1"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--workers", "-1"], "--workers"),
    (["--device", "gpu"], "--device"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-5"], "--steps"),
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--margin", "2"], "--margin"),
    (["--scale", "0"], "--scale"),
    (["--seed", "-1"], "--seed"),
    (["--threads", "0"], "--threads"),
    (["--image-size", "2"], "--image-size"),
    (["--model", "r51"], "r51"),
    (["--model-kwargs", "[1, 2]"], "--model-kwargs"),
    (["--head", "softmax"], "--head"),
    (["--batch-size", "128"], "use --batch-size 64 or less"),
    (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--config", "/nonexistent/run.yaml"], "/nonexistent/run.yaml"),
    (["--resume"], "holds no edgekd run"),
]
DISTILL_CASES = [
    (["--method", "magic"], "--method"),
    (["--teacher", "/nonexistent/teacher.safetensors"], "/nonexistent/teacher.safetensors"),
    (["--teacher-model", "r51"], "r51"),
    (["--w-kd", "-1"], "--w-kd"),
    (["--temperature", "0"], "--temperature"),
    (["--preset", "nope"], "nope"),
    (["--loss-backend", "cuda"], "--loss-backend"),
]


@pytest.mark.parametrize("command", ["teacher", "distill"])
@pytest.mark.parametrize("extra, fragment", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_training_option_is_one_line_and_writes_nothing(command, extra, fragment, tmp_path, run_cli, one_line):
    out = tmp_path / "run"
    code, _, err = run_cli([command, *T, *extra, "--out", str(out)])
    one_line(code, err, fragment)
    assert not out.exists()


@pytest.mark.parametrize("extra, fragment", DISTILL_CASES, ids=[" ".join(a) for a, _ in DISTILL_CASES])
def test_bad_distill_option_is_one_line_and_writes_nothing(extra, fragment, tmp_path, run_cli, one_line):
    out = tmp_path / "run"
    code, _, err = run_cli(["distill", *T, *extra, "--out", str(out)])
    one_line(code, err, fragment)
    assert not out.exists()


@pytest.mark.parametrize("command", ["teacher", "distill"])
def test_out_that_is_a_file_is_one_line(command, tmp_path, run_cli, one_line):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    code, _, err = run_cli([command, *T, "--out", str(out)])
    one_line(code, err, str(out))
    assert out.read_text() == "not a folder"
