"""Issue 23, class 7: advice that can be followed. Each case provokes a message that tells the user what to do, then
does exactly that (the option it names, the command it quotes, run through ``shlex``) and checks that it works.
Before: hints named a Python argument (``skip_bad=True``), printed paths with spaces unquoted, said "lower
--batch-size" without a value, and read a plain teacher state_dict with the student's ``--model``."""

from __future__ import annotations

import re
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from edgekd.data.recordio import RecordWriter, pack_record

BASE = ["--model", "r_tiny", "--batch-size", "4", "--steps", "1", "--device", "cpu", "--no-compile"]


def _faces(root, identities=2, per=3, broken=0, size=16):
    """An image folder of ``size``-pixel images; ``broken`` files of the first identity are not images."""
    rng = np.random.default_rng(0)
    for i in range(identities):
        (root / f"id{i}").mkdir(parents=True)
        for k in range(per):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"id{i}" / f"{k}.png")
    for k in range(broken):
        (root / "id0" / f"broken{k}.png").write_bytes(b"not a png at all")
    return root


def _recordio_with_a_damaged_record(root):
    """A train.rec/.idx of 2 identities x 3 images whose 4th record holds bytes that are no image."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    n = 6
    with RecordWriter(root / "train.rec", root / "train.idx") as w:
        w.write(0, pack_record([n + 1, n + 3]))  # identity records n+1, n+2 (not written): 2 identities
        for key in range(1, n + 1):
            image = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
            body = b"\xff\xd8 damaged" if key == 4 else _png(image)
            w.write(key, pack_record([(key - 1) // 3, 0], body))
    return root


def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _quoted_command(text: str) -> list[str]:
    """The first `edgekd ...` command in backquotes in ``text``, split as a shell would (edgekd dropped)."""
    found = re.search(r"`(edgekd [^`]+)`", text)
    assert found, text
    return shlex.split(found.group(1))[1:]


@pytest.mark.parametrize("kind", ["image folder", "RecordIO"])
def test_an_unreadable_training_image_names_an_option_that_exists_and_works(kind, tmp_path, run_cli, one_line):
    data = (
        _faces(tmp_path / "faces", broken=1)
        if kind == "image folder"
        else _recordio_with_a_damaged_record(tmp_path / "rec")
    )
    args = ["teacher", "--data", str(data), *BASE]
    line = one_line(*run_cli([*args, "--out", str(tmp_path / "a")])[::2])
    assert "--skip-bad" in line and "skip_bad=" not in line
    code, _, err = run_cli([*args, "--skip-bad", "--out", str(tmp_path / "b")])
    assert code in (0, None), err
    if kind == "image folder":  # a folder is decoded once up front; RecordIO's header pass cannot see image damage,
        assert "--skip-bad left out 1 unreadable image(s)" in err  # so its reads fall through to the next record


@pytest.mark.parametrize("folder", ["my run", "run 'quoted'", "runs/ü ß"])
def test_the_resume_command_printed_after_a_stop_runs_as_printed(folder, tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _faces(tmp_path / "faces")
    args = ["teacher", "--data", str(tmp_path / "faces"), "--model", "r_tiny", "--batch-size", "4", "--steps", "2",
            "--device", "cpu", "--no-compile"]  # fmt: skip
    code, stdout, err = run_cli([*args, "--stop-after", "1", "--out", str(tmp_path / folder)])
    assert code in (0, None), err
    again = _quoted_command(stdout)
    code, stdout, err = run_cli(again)
    assert code in (0, None), err
    assert (tmp_path / folder / "teacher.safetensors").is_file()


def test_the_command_named_for_a_folder_holding_a_run_resumes_it(tmp_path, run_cli, one_line):
    _faces(tmp_path / "faces")
    out = tmp_path / "a run with spaces"
    args = ["teacher", "--data", str(tmp_path / "faces"), "--model", "r_tiny", "--batch-size", "4", "--steps", "2",
            "--device", "cpu", "--no-compile"]  # fmt: skip
    assert run_cli([*args, "--stop-after", "1", "--out", str(out)])[0] in (0, None)
    line = one_line(*run_cli([*args, "--out", str(out)])[::2])  # the same command again, without --resume
    code, _, err = run_cli(_quoted_command(line))
    assert code in (0, None), err
    assert (out / "teacher.safetensors").is_file()


def test_the_batch_size_named_for_small_data_is_one_that_trains(tmp_path, run_cli, one_line):
    _faces(tmp_path / "faces", per=2)
    args = ["teacher", "--data", str(tmp_path / "faces"), "--model", "r_tiny", "--steps", "1", "--no-compile"]
    line = one_line(*run_cli([*args, "--batch-size", "64", "--out", str(tmp_path / "a")])[::2])
    size = re.search(r"use --batch-size (\d+) or less", line).group(1)
    code, _, err = run_cli([*args, "--batch-size", size, "--out", str(tmp_path / "b")])
    assert code in (0, None), err


def test_a_plain_teacher_state_dict_is_read_with_teacher_model_not_the_students_model(tmp_path, run_cli, one_line):
    """``distill --teacher backbone.pt`` reads its architecture from --teacher-model, the option the help names for
    it (the student's --model is another network), and a file that does not fit names --teacher-model too."""
    from edgekd.models import create_model

    _faces(tmp_path / "faces", per=4, size=112)  # a plain state_dict's model is built at its default 112 px input
    torch.manual_seed(0)
    torch.save(create_model("r_tiny").state_dict(), tmp_path / "backbone.pt")
    torch.save(create_model("r_tiny", embed_dim=32).state_dict(), tmp_path / "narrow.pt")
    args = ["distill", "--data", str(tmp_path / "faces"), "--method", "l2e", "--teacher-model", "r_tiny",
            "--model", "cnn_tiny", "--batch-size", "4", "--steps", "1", "--device", "cpu", "--no-compile",
            "--no-eval"]  # fmt: skip
    line = one_line(*run_cli([*args, "--teacher", str(tmp_path / "narrow.pt"), "--out", str(tmp_path / "a")])[::2])
    assert "pick the --teacher-model it was trained with" in line, line
    code, _, err = run_cli([*args, "--teacher", str(tmp_path / "backbone.pt"), "--out", str(tmp_path / "run")])
    assert code in (0, None), err
    assert (tmp_path / "run" / "student" / "student.safetensors").is_file()
