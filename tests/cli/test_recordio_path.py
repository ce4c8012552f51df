"""The documented RecordIO path (README "Training on your own data"): pack an image folder, train a teacher, distill
with the .bin sets beside train.rec as the evaluation, export INT8 calibrated from the same folder; and what distill
and export do with a folder that lacks .bin files, holds a broken one, or holds unreadable images."""

import json

import pytest
import torch
from PIL import Image

from edgekd.data import create_pairs
from edgekd.data.recordio import pack_image_folder
from edgekd.data.verification_bin import write_bin

SIZE = 32
FAST = ["--batch-size", "8", "--device", "cpu", "--no-compile", "--workers", "0"]


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgekd: error:"), err
    assert "Traceback" not in err
    return lines[0]


def _faces(root, identities=4, per_identity=10):
    """Aligned-face stand-ins: the built-in synthetic identities, one PNG folder per identity."""
    from edgekd.data.synthetic import SyntheticIdentities

    faces = SyntheticIdentities(identities=identities, images_per_identity=per_identity, image_size=SIZE, seed=3)
    for i in range(len(faces)):
        image, label = faces[i]
        (root / f"id{label:02d}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / f"id{label:02d}" / f"{i:03d}.png")
    return root


def _bin(path, seed=0, pairs=40):
    """An insightface verification .bin of held-out synthetic pairs at SIZE px."""
    pair_set = create_pairs(f"synthetic:pairs={pairs},pair_identities=10,pair_images=4,image_size={SIZE},seed={seed}")
    items = [pair_set.images[i] for i in range(len(pair_set.images))]
    images = torch.stack([item[0] if isinstance(item, tuple) else item for item in items])
    return write_bin(path, images, pair_set.issame)


@pytest.fixture
def recordio(tmp_path):
    """A packed RecordIO folder (4 identities x 10 images, 32 px) with lfw.bin and cfp_fp.bin beside train.rec."""
    folder = tmp_path / "ms1m-mini"
    pack_image_folder(_faces(tmp_path / "faces"), folder)
    _bin(folder / "lfw.bin", seed=1)
    _bin(folder / "cfp_fp.bin", seed=2)
    return folder


def _distill(folder, out, *extra):
    return ["distill", "--data", str(folder), "--model", "r_tiny", "--method", "vanilla", "--steps", "2", *FAST,
            *extra, "--out", str(out)]  # fmt: skip


def test_distill_on_recordio_evaluates_every_bin_beside_train_rec(recordio, tmp_path, run_cli):
    out = tmp_path / "run"
    code, stdout, err = run_cli(_distill(recordio, out))
    assert code == 0, err
    report = json.loads((out / "results.json").read_text())
    assert [(row["pairs"], row["role"]) for row in report["results"]] == [("lfw", "student"), ("cfp_fp", "student")]
    table = stdout[stdout.index("role") - 20 :]
    assert "lfw" in table and "cfp_fp" in table


def test_a_broken_bin_or_a_missing_pairs_file_stops_distill_before_it_trains(recordio, tmp_path, run_cli):
    (recordio / "agedb_30.bin").write_bytes(b"not a pickle")
    out = tmp_path / "run"
    code, stdout, err = run_cli(_distill(recordio, out))
    line = one_line_error(err)
    assert code == 2 and str(recordio / "agedb_30.bin") in line, line
    assert "vanilla: " not in stdout and not out.exists()  # nothing trained, no run folder

    (recordio / "agedb_30.bin").unlink()
    code, stdout, err = run_cli(_distill(recordio, out, "--pairs", str(tmp_path / "nothing.bin")))
    line = one_line_error(err)
    assert code == 2 and "nothing.bin" in line and "vanilla: " not in stdout and not out.exists()


def test_without_bin_files_or_pairs_distill_says_so_first_and_skips_verification(recordio, tmp_path, run_cli):
    for path in recordio.glob("*.bin"):
        path.unlink()
    out = tmp_path / "run"
    code, stdout, err = run_cli(_distill(recordio, out))
    assert code == 0, err
    lines = stdout.splitlines()
    (note,) = [i for i, line in enumerate(lines) if "no verification" in line and "--pairs" in line]
    first_step = next(i for i, line in enumerate(lines) if line.startswith("vanilla: "))
    assert note < first_step, stdout
    assert "results" not in json.loads((out / "results.json").read_text())
    assert (out / "student" / "student.safetensors").is_file()


@pytest.fixture
def student(tmp_path):
    from edgekd.bundle import Bundle, save_bundle
    from edgekd.models import create_model

    torch.manual_seed(0)
    return save_bundle(tmp_path / "student.safetensors", Bundle(backbone=create_model("mbf_tiny", input_size=SIZE)))


@pytest.mark.slow
def test_int8_export_takes_any_count_and_skip_bad_leaves_out_unreadable_images(tmp_path, student, run_cli):
    faces = _faces(tmp_path / "faces", identities=4, per_identity=8)
    (faces / "id01" / "broken.png").write_bytes(b"not an image")
    # Few gate images and pairs, and gates an untrained model passes: this test is about the calibration set.
    argv = ["export", str(student), "--precision", "int8", "--calib", str(faces), "--calib-images", "30",
            "--gate-images", "8", "--gate-batches", "8", "--pairs", "synthetic:pairs=100", "--max-drop", "100",
            "--min-cosine", "0.9", "--out", str(tmp_path / "s.int8.onnx")]  # fmt: skip
    code, _, err = run_cli(argv)
    line = one_line_error(err)
    assert code == 2 and "broken.png" in line and "--skip-bad" in line and "skip_bad=True" not in line, line
    code, stdout, err = run_cli([*argv, "--skip-bad"])
    assert code == 0, err
    assert "skipped 1 unreadable image" in stdout and "on 30 images" in stdout, stdout
    assert (tmp_path / "s.int8.onnx").is_file()


@pytest.mark.slow
def test_the_documented_recordio_commands_run_verbatim(tmp_path, run_cli, monkeypatch):
    """README "Training on your own data", with /data/ms1m-retinaface-t1 a packed folder and tiny sizes added."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data" / "ms1m-retinaface-t1"
    code, stdout, err = run_cli(["data", "pack", str(_faces(tmp_path / "faces")), str(data)])
    assert code == 0 and "packed 40 images of 4 identities" in stdout, err
    _bin(data / "lfw.bin", seed=1)

    code, _, err = run_cli(["teacher", "--data", str(data), "--model", "r_tiny", "--steps", "2", *FAST,
                            "--out", "runs/teacher"])  # fmt: skip
    assert code == 0, err
    code, stdout, err = run_cli(["distill", "--data", str(data), "--teacher", "runs/teacher/teacher.safetensors",
                                 "--method", "th-kd", "--model", "mbf_tiny", "--steps", "2", *FAST,
                                 "--out", "runs/mbf-thkd"])  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "runs/mbf-thkd/results.json").read_text())
    assert [(row["pairs"], row["role"]) for row in report["results"]] == [("lfw", "teacher"), ("lfw", "student")]

    student = "runs/mbf-thkd/student/student.safetensors"
    # --max-drop: two training steps leave every embedding near every other; the task gate would measure that noise.
    code, stdout, err = run_cli(["export", student, "--precision", "int8", "--calib", str(data), "--max-drop", "100"])
    assert code == 0, err
    assert f"on 40 images from {data}" in stdout, stdout
    assert (tmp_path / "runs/mbf-thkd/student/student.int8.onnx").is_file()
