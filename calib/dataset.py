"""Calibration sets: a fixed, normalized sample of images drawn from any ``edgekd.data`` source.

``SOURCE`` is an image folder (one subfolder per identity, or a flat folder of images), any ``create_dataset`` spec
(``synthetic:...``, ``rec:/path``, ``fmnist``), or ``builtin`` for the built-in synthetic identities. Images are drawn
without replacement with a seeded generator, resized to the model's input size, and normalized exactly as the model
expects (mean/std from its config), so calibration sees the deployment preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgekd.data import create_dataset
from edgekd.data.image_folder import IMAGE_EXTENSIONS, _decode
from edgekd.data.transforms import normalize
from edgekd.errors import DataError
from edgekd.utils.hashing import content_digest

__all__ = ["CalibrationSet", "build_calibration_set", "BUILTIN_SOURCES", "BatchReader"]

BUILTIN_SOURCES = ("builtin", "synthetic")


@dataclass
class CalibrationSet:
    """Normalized float32 images ``(N, C, H, W)`` and a fingerprint of their exact bytes.

    Attributes:
        images: the calibration inputs.
        source: what they were drawn from (for reports).
        fingerprint: hash of the bytes of ``images`` (keys the calibration cache).
    """

    images: np.ndarray
    source: str
    fingerprint: str

    def __len__(self) -> int:
        return len(self.images)

    def reader(self, input_name: str, batch_size: int = 16) -> BatchReader:
        """An ONNX Runtime ``CalibrationDataReader`` over the images."""
        return BatchReader(self.images, input_name, batch_size)


class BatchReader:
    """Feeds ``images`` in batches as ``{input_name: array}``; ``get_next`` returns None at the end (ORT protocol)."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int) -> None:
        self.images = images
        self.input_name = input_name
        self.batch_size = max(1, int(batch_size))
        self.start, self.end = 0, len(images)
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self.end:
            return None
        stop = min(self._pos + self.batch_size, self.end)
        batch = {self.input_name: self.images[self._pos : stop]}
        self._pos = stop
        return batch

    def rewind(self) -> None:
        self._pos = self.start

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self.images))
        self._pos = start_index

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def _open_source(source: str, channels: int, image_size: int, count: int):
    if source in BUILTIN_SOURCES:
        # one image of each of the first `count` training identities, fresh nuisance draws (split val): what the
        # model will see, not what it memorized; rendering only these keeps it fast
        return create_dataset(
            "synthetic", split="val", image_size=image_size, channels=channels, identities=count, images_per_identity=1
        )
    path = Path(source).expanduser()
    if path.is_dir() and not any(p.is_dir() for p in path.iterdir()):
        return _FlatFolder(path, image_size, channels)
    kw = {"image_size": image_size, "channels": channels}
    return create_dataset(source, split="train" if not source.startswith("synthetic") else "val", **kw)


class _FlatFolder:
    """A folder of images without class subfolders (common for calibration dumps)."""

    def __init__(self, root: Path, image_size: int, channels: int) -> None:
        self._decode = _decode
        self.files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise DataError(f"calibration folder {root} holds no images")
        self.mode = "RGB" if channels == 3 else "L"
        self.size = (image_size, image_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        arr = self._decode(self.files[index], self.mode, self.size)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), 0


def build_calibration_set(
    source: str,
    cfg,
    num_images: int = 128,
    seed: int = 0,
) -> CalibrationSet:
    """Draw ``num_images`` images from ``source`` and normalize them for a model with config ``cfg``.

    Args:
        source: an image folder, a ``create_dataset`` spec, or ``builtin``.
        cfg: the model's ``ModelCfg`` (input size, mean, std).
        num_images: how many images (all of them if the source has fewer).
        seed: picks which images.

    Returns:
        The calibration set.
    """
    channels, height, width = cfg.input_size
    if height != width:
        raise DataError(f"calibration needs a square input size, the model takes {height}x{width}")
    dataset = _open_source(str(source), channels, height, int(num_images))
    total = len(dataset)
    if total == 0:
        raise DataError(f"calibration source {source!r} is empty")
    count = min(int(num_images), total)
    index = np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
    batch = torch.stack([dataset[int(i)][0] for i in index])
    if tuple(batch.shape[1:]) != tuple(cfg.input_size):
        raise DataError(f"calibration images are {tuple(batch.shape[1:])}, the model takes {tuple(cfg.input_size)}")
    images = normalize(batch, cfg.mean, cfg.std).numpy()
    images = np.ascontiguousarray(images, dtype=np.float32)
    fingerprint = content_digest(str(images.shape), images.tobytes())
    return CalibrationSet(images=images, source=str(source), fingerprint=fingerprint)
