"""ImageFolder on generated PNG/JPEG files, including corrupt files and empty folders; folder dispatch."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from edgekd.data import create_dataset
from edgekd.data.image_folder import ImageFolder
from edgekd.errors import DataError


def _write(path, size, seed, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "faces"
    for c, name in enumerate(["bob", "alice", "carol"]):  # sorted: alice 0, bob 1, carol 2
        for i in range(3):
            _write(root / name / f"{i}.png", 20 if i else 24, seed=10 * c + i)
    (root / "alice" / "notes.txt").write_text("not an image")
    return root


def test_labels_shapes_and_resize(folder):
    ds = ImageFolder(folder, image_size=16)
    assert ds.classes == ["alice", "bob", "carol"] and ds.num_classes == 3 and len(ds) == 9
    assert ds.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2] and ds.skipped == 0
    img, label = ds[4]
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and label == 1
    gray = ImageFolder(folder, image_size=16, channels=1)
    assert gray[0][0].shape == (1, 16, 16)


def test_native_size_and_exact_pixels(tmp_path):
    arr = _write(tmp_path / "d" / "x" / "a.png", 12, seed=1)
    _write(tmp_path / "d" / "y" / "b.png", 12, seed=2)
    ds = ImageFolder(tmp_path / "d")
    assert ds.image_size == 12
    assert torch.equal(ds[0][0], torch.from_numpy(arr).permute(2, 0, 1))


def test_corrupt_file_named_or_skipped(folder):
    bad = folder / "bob" / "9_bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(buf, format="JPEG")
    truncated = folder / "carol" / "9_trunc.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    ds = ImageFolder(folder, image_size=16)
    assert len(ds) == 11
    with pytest.raises(DataError, match="9_bad.png"):
        ds[6]
    with pytest.raises(DataError, match="9_trunc.jpg"):
        ds[10]
    skipping = ImageFolder(folder, image_size=16, skip_bad=True)
    assert skipping.skipped == 2 and len(skipping) == 9
    assert sorted(os.path.basename(p) for p in skipping.bad_files) == ["9_bad.png", "9_trunc.jpg"]
    assert all(skipping[i][0].shape == (3, 16, 16) for i in range(len(skipping)))


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(DataError, match="no images"):
        create_dataset(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="neither a built-in name"):
        create_dataset(str(tmp_path / "missing"))


def test_fingerprint_tracks_files(folder):
    a = ImageFolder(folder, image_size=16).fingerprint
    assert a == ImageFolder(folder, image_size=16).fingerprint
    assert a != ImageFolder(folder, image_size=20).fingerprint
    _write(folder / "alice" / "9.png", 20, seed=99)
    assert a != ImageFolder(folder, image_size=16).fingerprint


def test_create_dataset_folder_dispatch_and_splits(folder, tmp_path):
    ds = create_dataset(str(folder), image_size=16, channels=None)
    assert isinstance(ds, ImageFolder) and len(ds) == 9
    with pytest.raises(DataError, match="no val split"):
        create_dataset(str(folder), split="val")
    split_root = tmp_path / "split"
    for split in ("train", "val"):
        for name in ("a", "b"):
            _write(split_root / split / name / "0.png", 8, seed=len(split) + len(name))
    assert len(create_dataset(str(split_root), split="val")) == 2
    with pytest.raises(DataError, match="no 'test' subfolder"):
        create_dataset(str(split_root), split="test")


def test_to_uint8_batch_and_normalize_on_decoded_arrays(tmp_path):
    from edgekd.data.transforms import normalize, to_uint8_batch

    arrs = [_write(tmp_path / f"{i}.png", 6, seed=i) for i in range(3)]  # (H, W, C) as PIL decodes them
    batch = to_uint8_batch(arrs, channels_last=True)
    assert batch.shape == (3, 3, 6, 6) and torch.equal(batch[1], torch.from_numpy(arrs[1]).permute(2, 0, 1))
    assert torch.equal(to_uint8_batch(batch), batch) and to_uint8_batch(batch[0]).shape == (1, 3, 6, 6)
    x = normalize(batch, 0.5, 0.5)
    # (v/255 − 0.5)/0.5 against (v − 127.5)/127.5 in float32: ≤ 4 roundings of values ≤ 2, ≈ 4.8e-7 (u = 2⁻²⁴)
    assert x.dtype == torch.float32 and torch.allclose(x, (batch.float() - 127.5) / 127.5, atol=1e-6)
    with pytest.raises(DataError, match="uint8"):
        normalize(x, 0.5, 0.5)
    with pytest.raises(DataError, match="differ in shape"):
        to_uint8_batch([batch[0], batch[0, :, :4]])
