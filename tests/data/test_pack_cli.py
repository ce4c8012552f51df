"""``edgekd data pack`` with unreadable images: one line naming the image and no output, or ``--skip-bad``."""

import io

import numpy as np
import pytest
from PIL import Image

from edgekd.data.recordio import RecordIODataset, RecordWriter, pack_record


def _save(path, seed, fmt="JPEG"):
    arr = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def _truncated_jpeg(path, seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[:300])


@pytest.fixture
def folder(tmp_path):
    """Three identities; person_01/bad.jpg is not an image, person_02 holds only a truncated JPEG."""
    root = tmp_path / "faces"
    _save(root / "person_00" / "0.jpg", 0)
    _save(root / "person_00" / "1.png", 1, "PNG")
    _save(root / "person_01" / "0.jpg", 2)
    (root / "person_01" / "bad.jpg").write_bytes(b"this is not a jpeg")
    _save(root / "person_01" / "c.jpg", 3)
    (root / "person_02").mkdir()
    _truncated_jpeg(root / "person_02" / "0.jpg", 4)
    return root


def test_first_bad_image_is_one_line_and_leaves_no_output(folder, tmp_path, run_cli):
    out = tmp_path / "rec"
    code, stdout, stderr = run_cli(["data", "pack", str(folder), str(out)])
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("edgekd: error: ") and "Traceback" not in stderr
    bad = folder / "person_01" / "bad.jpg"
    assert f"{bad}: cannot read the image (not a known image format)" in stderr
    assert "BytesIO" not in stderr and "--skip-bad" in stderr
    assert not out.exists()  # created by the failed run, so removed again
    # an existing output folder keeps what it held, and gains no file, not even a temporary one
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_cli(["data", "pack", str(folder), str(out)])[0] == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_skip_bad_packs_the_rest_and_lists_what_it_skipped(folder, tmp_path, run_cli):
    out = tmp_path / "rec"
    code, stdout, stderr = run_cli(["data", "pack", str(folder), str(out), "--skip-bad"])
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == f"packed 4 images of 3 identities into {out / 'train.rec'}"
    assert lines[1] == "skipped 2 unreadable images:"
    assert lines[2] == f"  {folder / 'person_01' / 'bad.jpg'}: cannot read the image (not a known image format)"
    assert lines[3].startswith(f"  {folder / 'person_02' / '0.jpg'}: cannot read the image (")
    assert "truncated" in lines[3].lower()  # PIL's wording varies with the point where the data ends
    assert len(lines) == 4 and sorted(p.name for p in out.iterdir()) == ["train.idx", "train.rec"]
    ds = RecordIODataset(out)
    assert len(ds) == 4 and ds.num_classes == 3 and ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.read_record(0)[0].label == (5.0, 8.0)  # header: images 1..4, identities 5..7
    # identity records: person_02 keeps its class id with an empty key range
    assert [ds.read_record(k)[0].label for k in (5, 6, 7)] == [(1.0, 3.0), (3.0, 5.0), (5.0, 5.0)]
    assert all(ds[i][0].shape == (3, 12, 12) for i in range(4))


def test_skip_bad_lists_only_the_first_few(tmp_path, run_cli):
    root = tmp_path / "faces"
    _save(root / "a" / "good.jpg", 0)
    for i in range(8):
        (root / "a" / f"bad{i}.jpg").write_bytes(b"junk")
    code, stdout, _ = run_cli(["data", "pack", str(root), str(tmp_path / "rec"), "--skip-bad"])
    assert code == 0 and "packed 1 images of 1 identities" in stdout
    assert "skipped 8 unreadable images:" in stdout and stdout.count("/bad") == 5 and "... and 3 more" in stdout


def test_skip_bad_with_nothing_readable_writes_nothing(tmp_path, run_cli):
    root = tmp_path / "faces"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"junk")
    code, _, stderr = run_cli(["data", "pack", str(root), str(tmp_path / "rec"), "--skip-bad"])
    assert code == 2 and stderr.count("\n") == 1 and "none of the 1 images" in stderr and "x.png" in stderr
    assert not (tmp_path / "rec").exists()


def test_overwrite_needs_a_record_of_the_same_length(tmp_path):
    with RecordWriter(tmp_path / "x.rec") as w:
        at = w.write(0, pack_record([1, 2]))
        w.write(1, pack_record([0, 0], b"body"))
        w.overwrite(at, pack_record([2, 2]))  # the header: image 1, no identities
        with pytest.raises(ValueError, match="single-chunk record of 28 bytes"):
            w.overwrite(at, pack_record(3.0, b"abcd"))
    ds = RecordIODataset(tmp_path / "x.rec", image_size=1)
    assert ds.read_record(0)[0].label == (2.0, 2.0) and ds.read_record(1)[1] == b"body"
