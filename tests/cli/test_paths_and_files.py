"""Issue 23, class 3: every command that writes checks its output path before any work, in one line: a file where a
folder belongs, a parent that is a file, symbolic-link loops and dangling links, names that are not UTF-8; a disk that
fills during a write is one line too, with nothing half-written left. Paths with spaces, non-ASCII letters, links to
real folders and trailing slashes work."""

from __future__ import annotations

import os

import pytest

from edgekd.utils.out_paths import check_output_dir, check_output_file

DATA = "synthetic:identities=8,images_per_identity=3,image_size=16"
TRAIN = ["--data", DATA, "--model", "r_tiny", "--batch-size", "8", "--steps", "1", "--device", "cpu", "--no-compile"]


def _image_folder(root):
    from PIL import Image

    for who in ("a", "b"):
        (root / who).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (8, 8), (40 * k, 90, 200)).save(root / who / f"{k}.jpg")
    return root


def _argv(command, out, tmp_path):
    """The command line of ``command`` writing to ``out`` (as text, the way a shell hands it over)."""
    out = os.fsdecode(out)
    if command in ("teacher", "distill"):
        return [command, *TRAIN, "--out", out] + (["--method", "vanilla", "--no-eval"] if command == "distill" else [])
    if command == "study":
        return ["study", "--profile", "v3-tiny", "--out", out, "--fmnist-root", str(tmp_path / "none")]
    return ["data", "pack", str(_image_folder(tmp_path / "images")), out]


def _bad_places(tmp_path):
    """(name, the output path, text the one-line error must contain): each made on disk here."""
    file = tmp_path / "a file"
    file.write_text("x")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "missing target")
    return {
        "an existing file": (file, "is a file"),
        "under a file": (file / "run", "is a file"),
        "two levels under a file": (file / "a" / "b", "is a file"),
        "a symbolic-link loop": (loop, "symbolic-link loop"),
        "under a symbolic-link loop": (loop / "run", "symbolic-link loop"),
        "a dangling symbolic link": (dangling, "does not exist"),
        "a name that is not UTF-8": (tmp_path / os.fsdecode(b"run-\xff\xfe"), "not UTF-8"),
    }


BAD = [
    "an existing file",
    "under a file",
    "two levels under a file",
    "a symbolic-link loop",
    "under a symbolic-link loop",
    "a dangling symbolic link",
    "a name that is not UTF-8",
]


@pytest.mark.parametrize("command", ["teacher", "distill", "study", "data pack"])
@pytest.mark.parametrize("place", BAD)
def test_an_output_path_that_cannot_be_a_folder_is_one_line_before_any_work(command, place, tmp_path, run_cli):
    out, fragment = _bad_places(tmp_path)[place]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(_argv(command, out, tmp_path))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err
    # Nothing new beside the bad path (data pack's generated images aside).
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "images") == before


@pytest.mark.parametrize("place", BAD[1:5] + BAD[6:] + ["an existing folder"])
def test_data_pack_bin_checks_its_output_file(place, tmp_path, run_cli):
    places = {**_bad_places(tmp_path), "an existing folder": (tmp_path, "is an existing folder")}
    out, fragment = places[place]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a/0.jpg a/1.jpg 1\n")
    code, _, err = run_cli(["data", "pack-bin", str(pairs), os.fsdecode(out)])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err


@pytest.mark.parametrize(
    "name",
    ["with spaces/run 1", "non-ASCII/résumé-Ωμέγα-顔", "trailing slash/run/", "link to a folder", "existing empty"],
)
def test_unusual_but_valid_output_folders_work(name, tmp_path, run_cli):
    if name == "link to a folder":
        (tmp_path / "real").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "real")
        out = str(tmp_path / "link")
    elif name == "existing empty":
        (tmp_path / "empty").mkdir()
        out = str(tmp_path / "empty")
    else:
        out = str(tmp_path / name)
    code, _, err = run_cli(["teacher", *TRAIN, "--out", out])
    assert code in (0, None), err
    assert (tmp_path / name.rstrip("/") if "/" in name else tmp_path).exists()
    assert os.path.isfile(os.path.join(out, "teacher.safetensors"))
    code, _, err = run_cli(["teacher", "--out", out, "--resume"])  # the saved absolute path reads back
    assert code in (0, None), err


def test_data_pack_into_a_non_ascii_folder(tmp_path, run_cli):
    out = tmp_path / "données Ω"
    code, _, err = run_cli(["data", "pack", str(_image_folder(tmp_path / "images")), str(out)])
    assert code in (0, None), err
    assert (out / "train.rec").is_file() and (out / "train.idx").is_file()


@pytest.mark.parametrize(
    "failure",
    [
        OSError(28, "No space left on device", "/runs/x/teacher.safetensors"),
        RuntimeError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        ),  # fmt: skip
        OSError(122, "Disk quota exceeded"),
    ],
    ids=["OSError ENOSPC", "safetensors' wrapped error", "quota"],
)
def test_a_disk_that_fills_during_a_write_is_one_line_and_leaves_nothing(failure, tmp_path, run_cli, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "run"
    code, _, err = run_cli(["teacher", *TRAIN, "--out", str(out)])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "the disk is full" in lines[0], err
    assert not out.exists()  # no checkpoint was made, so the run folder is undone


def test_the_checks_themselves_accept_what_can_be_written(tmp_path):
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert check_output_file(tmp_path / "x" / "m.onnx", ".onnx").name == "m.onnx"
    (tmp_path / "m.bin").write_bytes(b"old")
    assert check_output_file(tmp_path / "m.bin") == tmp_path / "m.bin"  # replaced atomically later
    with pytest.raises(Exception, match="must end in .onnx"):
        check_output_file(tmp_path / "m.pt", ".onnx")
