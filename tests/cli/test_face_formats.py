"""Face formats through the CLI: pack a folder to RecordIO, train on it, evaluate on a .bin and an IJB folder."""

import json

import numpy as np
import pytest
from PIL import Image

from edgekd.data.align import ARCFACE_TEMPLATE
from edgekd.data.synthetic import SyntheticIdentities
from edgekd.data.verification_bin import write_bin


@pytest.fixture(scope="module")
def faces():
    return SyntheticIdentities(identities=6, images_per_identity=6, image_size=32, seed=2)


def _image_folder(root, faces):
    for i in range(len(faces)):
        image, label = faces[i]
        folder = root / f"id{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root


def _ijb_folder(root, faces):
    """Two templates per identity (one image each); crops 112×112 with template landmarks."""
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    lmk = " ".join(f"{v:.4f}" for v in ARCFACE_TEMPLATE.ravel())
    tids, marks = [], []
    for k in range(12):
        image, _ = faces[k * 3]
        big = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((112, 112))
        big.save(root / "loose_crop" / f"{k + 1}.jpg", quality=95)
        tids.append(f"{k + 1}.jpg {k + 1} {k + 1}")
        marks.append(f"{k + 1}.jpg {lmk} 0.9")
    pairs = [(a + 1, b + 1, int(a * 3 // 6 == b * 3 // 6)) for a in range(12) for b in range(a + 1, 12)]
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(tids) + "\n")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(marks) + "\n")
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("".join(f"{a} {b} {y}\n" for a, b, y in pairs))
    return root


def test_pack_train_and_evaluate_on_bin_and_ijb(faces, tmp_path, run_cli):
    folder = _image_folder(tmp_path / "folder", faces)
    code, _, err = run_cli(["data", "pack", str(folder), str(tmp_path / "rec")])
    assert code == 0, err
    assert (tmp_path / "rec" / "train.rec").is_file() and (tmp_path / "rec" / "train.idx").is_file()

    args = [
        "distill",
        "--data",
        str(tmp_path / "rec"),
        "--method",
        "vanilla",
        "--model",
        "mbf_tiny",
        "--batch-size",
        "8",
        "--steps",
        "3",
        "--no-compile",
        "--device",
        "cpu",
        "--no-eval",
        "--out",
        str(tmp_path / "run"),
    ]
    code, _, err = run_cli(args)
    assert code == 0, err
    student = tmp_path / "run" / "student" / "student.safetensors"
    assert student.is_file()

    # 20 pairs: pair i is images (i, i + 1) of the same identity when both fall in one identity's 6 images
    order = [j for i in range(20) for j in (i, i + 1 if i % 2 == 0 else i + 6)]
    images = np.stack([faces[j % len(faces)][0].numpy() for j in order])
    issame = [
        faces[a % len(faces)][1] == faces[b % len(faces)][1] for a, b in zip(order[::2], order[1::2], strict=True)
    ]
    write_bin(tmp_path / "pairs.bin", images, issame, image_format="png")
    code, out, err = run_cli(
        [
            "eval",
            str(student),
            "--pairs",
            str(tmp_path / "pairs.bin"),
            "--ijb",
            str(_ijb_folder(tmp_path / "IJBC", faces)),
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    assert code == 0, err
    assert "pairs.bin: accuracy" in out and "IJB: TAR@FAR" in out
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert str(tmp_path / "pairs.bin") in report and "ijb" in report
