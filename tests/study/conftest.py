"""Fixtures of the study tests: small learnable Fashion-MNIST idx files and one torch thread."""

import struct

import numpy as np
import pytest
import torch

TRAIN_IMAGES = 5000 + 200  # the Fashion-MNIST reader carves a 5,000-image val split out of train


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory):
    """Small learnable idx files: each class is a bright band at its own rows, plus noise."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", TRAIN_IMAGES), ("t10k", 64)):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images = rng.integers(0, 80, (n, 28, 28), dtype=np.uint8)
        for k in range(10):
            images[labels == k, 2 * k + 4 : 2 * k + 7, 4:24] = 220
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(images))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))
    return root


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
