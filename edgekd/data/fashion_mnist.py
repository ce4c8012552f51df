"""Fashion-MNIST from its idx files, as the Debian package ``dataset-fashion-mnist`` installs them.

The package puts ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and
``t10k-labels-idx1-ubyte.gz`` in ``/usr/share/datasets/fashion-mnist``; uncompressed copies (no ``.gz``) work too.
Splits: ``test`` is the 10,000 t10k images; ``val`` is ``val_size`` images held out of the 60,000 training images
by a seeded permutation, and ``train`` is the rest (all 60,000 when ``val_size=0``).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from edgekd.errors import DataError
from edgekd.utils.hashing import content_digest

__all__ = ["FashionMNIST", "DEFAULT_ROOT", "CLASSES", "read_idx"]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_PREFIX = {"train": "train", "val": "train", "test": "t10k"}


def read_idx(data: bytes, name: str = "idx") -> np.ndarray:
    """Parse an (uncompressed) unsigned-byte idx file: magic ``0x0000 08 nd``, ``nd`` big-endian sizes, then data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{name} is not an idx file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DataError(f"{name} holds idx type 0x{dtype_code:02x}; only unsigned bytes (0x08) are supported")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(shape))
    if len(data) - header != count:
        raise DataError(f"{name} has {len(data) - header} data bytes, its header says {count}; the file is corrupt")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _load(root: Path, stem: str) -> tuple[np.ndarray, bytes]:
    """Read ``root/stem`` or ``root/stem.gz``; returns the array and the raw file bytes' digest."""
    for path, opener in ((root / f"{stem}.gz", gzip.open), (root / stem, open)):
        if path.is_file():
            try:
                with opener(path, "rb") as f:
                    data = f.read()
            except (OSError, EOFError) as e:
                raise DataError(f"cannot read {path}: {e}") from None
            return read_idx(data, str(path)), bytes.fromhex(content_digest(data, length=40, algorithm="sha1"))
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; run `apt-get install dataset-fashion-mnist` "
        "or pass fmnist:/path/to/folder"
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST; yields ``(image: uint8 (C, S, S), label: int)`` with ``C = channels``, ``S = 28`` by default.

    Args:
        root: folder with the idx files (default: where the Debian package installs them).
        split: ``train``, ``val`` or ``test``.
        val_size: images held out of the training set for ``val`` (0: ``train`` is all 60,000, ``val`` is empty).
        seed: seed of the permutation that picks the held-out images.
        image_size: resize (bilinear) to this side; None keeps 28.
        channels: 1 (as stored) or 3 (gray replicated, for RGB models).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        val_size: int = 5000,
        seed: int = 0,
        image_size: int | None = None,
        channels: int = 1,
    ) -> None:
        if split not in _PREFIX:
            raise DataError(f"Fashion-MNIST split {split!r} is not one of train, val, test")
        if channels not in (1, 3):
            raise DataError(f"channels={channels} must be 1 or 3")
        self.root = Path(root) if root is not None else DEFAULT_ROOT
        if not self.root.is_dir():
            raise DataError(
                f"Fashion-MNIST folder {self.root} does not exist; run `apt-get install "
                "dataset-fashion-mnist` or pass fmnist:/path/to/folder"
            )
        prefix = _PREFIX[split]
        images, img_digest = _load(self.root, f"{prefix}-images-idx3-ubyte")
        labels, lab_digest = _load(self.root, f"{prefix}-labels-idx1-ubyte")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"Fashion-MNIST {prefix} files in {self.root} disagree: images {images.shape}, labels {labels.shape}"
            )
        if split != "test":
            if not 0 <= val_size < len(images):
                raise DataError(f"val_size={val_size} must be in [0, {len(images)})")
            perm = np.random.default_rng(seed).permutation(len(images))
            held = np.sort(perm[len(images) - val_size :])
            keep = held if split == "val" else np.setdiff1d(np.arange(len(images)), held, assume_unique=True)
            images, labels = images[keep], labels[keep]
            self.indices = keep
        else:
            images, labels = images.copy(), labels.copy()  # frombuffer arrays are read-only
            self.indices = np.arange(len(images))
        if split == "val" and len(images) == 0:
            raise DataError("the Fashion-MNIST val split is empty with val_size=0; pass val_size > 0")
        x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
        if image_size is not None and image_size != x.shape[-1]:
            x = F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear", align_corners=False)
            x = x.round_().clamp_(0, 255).to(torch.uint8)
        self.images = x.expand(-1, channels, -1, -1).contiguous() if channels == 3 else x
        self.labels = torch.from_numpy(labels.astype(np.int64))
        if len(self.labels) and int(self.labels.max()) >= len(CLASSES):
            raise DataError(f"Fashion-MNIST labels in {self.root} exceed 9; the label file is corrupt")
        self.split, self.channels = split, channels
        self.image_size = int(self.images.shape[-1])
        self.num_classes = len(CLASSES)
        self.classes = CLASSES
        carve = "" if split == "test" else f"{val_size}:{seed}"
        meta = f"fmnist:v1:{split}:{carve}:{self.image_size}:{channels}"
        self.fingerprint = content_digest(img_digest, lab_digest, meta, algorithm="sha1")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])
