"""Fashion-MNIST reader on small idx files written by the test (gzip and raw)."""

import gzip
import struct

import numpy as np
import pytest
import torch

from edgekd.data import create_dataset
from edgekd.data.fashion_mnist import DEFAULT_ROOT, FashionMNIST, read_idx
from edgekd.errors import DataError


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


@pytest.fixture
def root(tmp_path):
    rng = np.random.default_rng(0)
    data = {
        "train": (rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), rng.integers(0, 10, 60, dtype=np.uint8)),
        "t10k": (rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), rng.integers(0, 10, 12, dtype=np.uint8)),
    }
    for prefix, (images, labels) in data.items():
        img_bytes, lab_bytes = _idx(images), _idx(labels)
        if prefix == "train":  # gzip, as the Debian package ships them
            (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(img_bytes))
            (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(lab_bytes))
        else:  # raw
            (tmp_path / "t10k-images-idx3-ubyte").write_bytes(img_bytes)
            (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(lab_bytes)
    return tmp_path, data


def test_read_idx_roundtrip_and_corruption():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(_idx(arr)), arr)
    with pytest.raises(DataError, match="magic"):
        read_idx(b"\x01\x02\x08\x01")
    with pytest.raises(DataError, match="corrupt"):
        read_idx(_idx(arr)[:-1])


def test_splits_contents_and_val_carving(root):
    path, data = root
    test = FashionMNIST(path, split="test")
    assert len(test) == 12 and test.num_classes == 10 and test.channels == 1 and test.image_size == 28
    img, label = test[3]
    assert img.shape == (1, 28, 28) and img.dtype == torch.uint8
    assert torch.equal(img[0], torch.from_numpy(data["t10k"][0][3])) and label == int(data["t10k"][1][3])
    train = FashionMNIST(path, split="train", val_size=15, seed=1)
    val = FashionMNIST(path, split="val", val_size=15, seed=1)
    assert len(train) == 45 and len(val) == 15
    assert set(train.indices).isdisjoint(val.indices) and set(train.indices) | set(val.indices) == set(range(60))
    k = int(val.indices[0])
    assert torch.equal(val[0][0][0], torch.from_numpy(data["train"][0][k])) and val[0][1] == int(data["train"][1][k])
    assert np.array_equal(FashionMNIST(path, split="val", val_size=15, seed=1).indices, val.indices)
    assert not np.array_equal(FashionMNIST(path, split="val", val_size=15, seed=2).indices, val.indices)
    assert len(FashionMNIST(path, split="train", val_size=0)) == 60
    assert len({train.fingerprint, val.fingerprint, test.fingerprint}) == 3


def test_resize_channels_and_dispatch(root):
    path, _ = root
    ds = create_dataset(f"fmnist:{path}", split="val", val_size=10, image_size=32, channels=3)
    assert isinstance(ds, FashionMNIST) and len(ds) == 10 and ds[0][0].shape == (3, 32, 32)
    assert torch.equal(ds[0][0][0], ds[0][0][2])
    assert len(create_dataset(f"fashion-mnist:{path}", split="test")) == 12


def test_missing_files_say_what_to_do(tmp_path, root):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "half", split="test")
    with pytest.raises(DataError, match="split"):
        FashionMNIST(root[0], split="dev")


@pytest.mark.skipif(not DEFAULT_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_installed_package():
    assert len(FashionMNIST(split="test")) == 10000
    assert len(FashionMNIST(split="train")) + len(FashionMNIST(split="val")) == 60000
