"""Issue 23, class 1: a command that fails before its first checkpoint leaves ``--out`` exactly as it found it, and
the corrected command then runs in the same folder.

The failures here get past option parsing (``test_bad_input_train.py`` covers those): a teacher that cannot serve the
data or the student, a broken pair set, a loss that diverges, an interruption, model arguments the model refuses.
Each case runs the real CLI into a folder that already holds a file of the user's, compares the folder's files and
bytes before and after, then runs the corrected command there.
"""

from __future__ import annotations

import hashlib

import pytest

from edgekd.cli.run_folder import undo_if_nothing_made

DATA = "synthetic:identities=16,images_per_identity=4,image_size=16"
BASE = ["--data", DATA, "--model", "r_tiny", "--batch-size", "8", "--steps", "2", "--device", "cpu", "--no-compile"]
# The arguments that make a tiny run's teacher serve BASE's data, head and student.
TEACHER_OK = "teacher_ok"


def _snapshot(root):
    """Relative path -> sha256 of every file (None for folders) under ``root``."""
    if not root.exists():
        return None
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Tiny teacher files: one that serves BASE, and ones that cannot (other classes, head, width)."""
    from edgekd.cli import main

    root = tmp_path_factory.mktemp("teachers")
    made = {}
    variants = {
        TEACHER_OK: [],
        "other_classes": ["--data", DATA.replace("identities=16", "identities=12")],
        "other_scale": ["--scale", "32"],
        "other_width": ["--model-kwargs", '{"embed_dim": 24}'],
    }
    for name, extra in variants.items():
        out = root / name
        try:
            main(["teacher", *BASE, *extra, "--out", str(out)])
        except SystemExit as exc:
            assert exc.code in (0, None)
        made[name] = str(out / "teacher.safetensors")
    return made


def _with_users_file(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("the user's own file\n")
    return _snapshot(folder)


def _broken_bin(tmp_path):
    path = tmp_path / "lfw.bin"
    path.write_bytes(b"\x80\x04 this is not a pickle of pairs")
    return str(path)


# (name, failing arguments, corrected arguments, text of the one-line error or None when the failure is not a user
# error). {teacher:NAME} stands for a teacher file of the fixture; {bin} for a broken .bin.
DISTILL_CASES = [
    ("teacher of other classes", ["--method", "kd", "--teacher", "{teacher:other_classes}"],
     ["--method", "kd", "--teacher", "{teacher:teacher_ok}"], "classes"),
    ("teacher of another head scale", ["--method", "th-kd", "--teacher", "{teacher:other_scale}"],
     ["--method", "th-kd", "--teacher", "{teacher:teacher_ok}"], "--scale 32"),
    ("sh-kd teacher of another width", ["--method", "sh-kd", "--teacher", "{teacher:other_width}"],
     ["--method", "sh-kd", "--teacher", "{teacher:teacher_ok}"], "embeds to 24 dims"),
    ("th-kd student width unlike the teacher's",
     ["--method", "th-kd", "--teacher", "{teacher:teacher_ok}", "--model-kwargs", '{"embed_dim": 24}'],
     ["--method", "th-kd", "--teacher", "{teacher:teacher_ok}"], "embed_dim 24"),
    ("l2e student width unlike the teacher's",
     ["--method", "l2e", "--teacher", "{teacher:teacher_ok}", "--model-kwargs", '{"embed_dim": 24}'],
     ["--method", "l2e", "--teacher", "{teacher:teacher_ok}"], "embed_dim 24"),
    ("broken verification .bin", ["--method", "vanilla", "--pairs", "{bin}"], ["--method", "vanilla"], "lfw.bin"),
    ("loss diverges at once", ["--method", "vanilla", "--lr", "1e30", "--steps", "4"], ["--method", "vanilla"],
     "loss became"),
    ("kd loss diverges at once",
     ["--method", "kd", "--teacher", "{teacher:teacher_ok}", "--lr", "1e30", "--steps", "4"],
     ["--method", "kd", "--teacher", "{teacher:teacher_ok}"], "loss became"),
    ("model argument the model lacks", ["--method", "vanilla", "--model-kwargs", '{"depth_typo": 3}'],
     ["--method", "vanilla"], None),
]  # fmt: skip
TEACHER_CASES = [
    ("loss diverges at once", ["--lr", "1e30", "--steps", "4"], [], "loss became"),
    ("model argument the model lacks", ["--model-kwargs", '{"depth_typo": 3}'], [], None),
    ("student head of other classes", ["--student-head", "{teacher:other_classes}"], [], "classes"),
]


def _fill(args, teachers, tmp_path):
    out = []
    for a in args:
        if a.startswith("{teacher:"):
            a = teachers[a[len("{teacher:") : -1]]
        elif a == "{bin}":
            a = _broken_bin(tmp_path)
        out.append(a)
    return out


def _check(command, bad, good, fragment, teachers, tmp_path, run_cli):
    folder = tmp_path / "my run"  # a space in the name, as users' folders have
    before = _with_users_file(folder)
    code, _, err = run_cli([command, *BASE, *_fill(bad, teachers, tmp_path), "--out", str(folder)])
    assert code != 0
    if fragment is not None:
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and fragment in lines[0], err
        assert "Traceback" not in err
    assert _snapshot(folder) == before  # nothing added, nothing changed, the user's file kept
    code, _, err = run_cli([command, *BASE, *_fill(good, teachers, tmp_path), "--out", str(folder), "--no-eval"]
                           if command == "distill" else [command, *BASE, *_fill(good, teachers, tmp_path),
                                                          "--out", str(folder)])  # fmt: skip
    assert code in (0, None), err
    assert (folder / "notes.txt").read_text() == "the user's own file\n"
    assert (folder / "settings.json").is_file()


@pytest.mark.parametrize("name, bad, good, fragment", DISTILL_CASES, ids=[c[0] for c in DISTILL_CASES])
def test_distill_failing_before_its_first_checkpoint_leaves_the_folder_as_it_was(
    name, bad, good, fragment, teachers, tmp_path, run_cli
):
    _check("distill", bad, good, fragment, teachers, tmp_path, run_cli)


@pytest.mark.parametrize("name, bad, good, fragment", TEACHER_CASES, ids=[c[0] for c in TEACHER_CASES])
def test_teacher_failing_before_its_first_checkpoint_leaves_the_folder_as_it_was(
    name, bad, good, fragment, teachers, tmp_path, run_cli
):
    _check("teacher", bad, good, fragment, teachers, tmp_path, run_cli)


def test_an_interruption_before_the_first_checkpoint_leaves_a_new_folder_absent(tmp_path, run_cli, monkeypatch):
    import edgekd.distill.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "fit", interrupted)
    folder = tmp_path / "new run"
    code, _, err = run_cli(["teacher", *BASE, "--out", str(folder)])
    assert code == 130 and not folder.exists()
    # The advice fits what is left: no run to resume, so no --resume (the path quoted, it has a space).
    assert err.strip() == f"edgekd: aborted; nothing was saved in '{folder}'; rerun the command to start again"


def test_what_a_checkpoint_or_model_makes_worth_keeping_is_kept(tmp_path):
    """The undo leaves everything once the failing block wrote a checkpoint or a model file."""
    for made in ("checkpoints/step_0000004/state.json", "student/student.safetensors"):
        folder = tmp_path / made.split("/")[0]
        with pytest.raises(RuntimeError), undo_if_nothing_made(folder):
            (folder / made).parent.mkdir(parents=True)
            (folder / made).write_text("x")
            (folder / "settings.json").write_text("{}")
            raise RuntimeError("late failure")
        assert (folder / made).is_file() and (folder / "settings.json").is_file()


def test_the_undo_removes_only_what_the_block_created(tmp_path):
    folder = tmp_path / "run"
    (folder / "old").mkdir(parents=True)
    (folder / "old" / "kept.txt").write_text("k")
    with pytest.raises(ValueError), undo_if_nothing_made(folder):
        (folder / "old" / "new.txt").write_text("n")
        (folder / "deep" / "er").mkdir(parents=True)
        (folder / "settings.json").write_text("{}")
        raise ValueError
    assert _snapshot(folder) == {"old": None, "old/kept.txt": hashlib.sha256(b"k").hexdigest()}
    with undo_if_nothing_made(folder, enabled=True):  # no failure: nothing removed
        (folder / "settings.json").write_text("{}")
    assert (folder / "settings.json").is_file()


def test_data_pack_failing_on_an_image_leaves_its_folder_then_packs_there(tmp_path, run_cli):
    from PIL import Image

    for who in ("a", "b"):
        (tmp_path / "images" / who).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (16, 16), (60 * k, 90, 9)).save(tmp_path / "images" / who / f"{k}.png")
    (tmp_path / "images" / "b" / "bad.png").write_bytes(b"not an image")
    folder = tmp_path / "packed"
    before = _with_users_file(folder)
    code, _, err = run_cli(["data", "pack", str(tmp_path / "images"), str(folder)])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--skip-bad" in lines[0] and "skip_bad=" not in lines[0], err
    assert _snapshot(folder) == before
    code, _, err = run_cli(["data", "pack", str(tmp_path / "images"), str(folder), "--skip-bad"])
    assert code in (0, None), err
    assert (folder / "train.rec").is_file() and (folder / "notes.txt").is_file()
