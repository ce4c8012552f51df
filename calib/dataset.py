"""Calibration sets: a fixed, normalized sample of images drawn from any ``edgekd.data`` source.

``SOURCE`` is anything training's ``--data`` takes (an image folder, a RecordIO folder or ``.rec`` file with or
without ``rec:``, ``synthetic:...``, ``fmnist``; ``edgekd.data.resolve_data`` tells them apart), a flat folder of
images, or ``builtin`` for the built-in synthetic identities. Images are drawn without replacement with a seeded
generator, resized to the model's input size, and normalized exactly as the model expects (mean/std from its config),
so calibration sees the deployment preprocessing. With ``skip_bad`` an image that cannot be read is left out and
another one drawn in its place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgekd.data import create_dataset, resolve_data
from edgekd.data.image_folder import IMAGE_EXTENSIONS, _decode
from edgekd.data.transforms import normalize
from edgekd.errors import DataError
from edgekd.utils.hashing import content_digest

__all__ = ["CalibrationSet", "build_calibration_set", "BUILTIN_SOURCES", "BatchReader", "even_batch_size"]

BUILTIN_SOURCES = ("builtin", "synthetic")


@dataclass
class CalibrationSet:
    """Normalized float32 images ``(N, C, H, W)`` and a fingerprint of their exact bytes.

    Attributes:
        images: the calibration inputs.
        source: what they were drawn from (for reports).
        fingerprint: hash of the bytes of ``images`` (keys the calibration cache).
        skipped: what was wrong with each drawn image that could not be read and was left out (``skip_bad``).
    """

    images: np.ndarray
    source: str
    fingerprint: str
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def reader(self, input_name: str, batch_size: int = 16) -> BatchReader:
        """An ONNX Runtime ``CalibrationDataReader`` over the images."""
        return BatchReader(self.images, input_name, batch_size)


def even_batch_size(count: int, batch_size: int) -> int:
    """The largest batch size up to ``batch_size`` that divides ``count`` (1 at worst): every batch the same size.

    ONNX Runtime's histogram calibrators (entropy, percentile) stack the outputs of all batches into one array, which
    fails on a shorter last batch; batches of one size give exactly the ranges of the whole set run as one batch.
    """
    batch_size = max(1, min(int(batch_size), int(count)))
    return next(b for b in range(batch_size, 0, -1) if count % b == 0)


class BatchReader:
    """Feeds ``images`` in batches as ``{input_name: array}``; ``get_next`` returns None at the end (ORT protocol).

    Batches all have one size (``even_batch_size``), at most ``batch_size``.
    """

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int) -> None:
        self.images = images
        self.input_name = input_name
        self.batch_size = even_batch_size(len(images), batch_size) if len(images) else 1
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
    data = resolve_data(source)  # the --data resolution, so --calib takes every spelling --data takes
    if data.kind == "folder" and not any(p.is_dir() for p in data.path.iterdir()):
        return _FlatFolder(data.path, image_size, channels)
    kw = {"image_size": image_size, "channels": channels}
    return create_dataset(source, split="val" if data.kind == "synthetic" else "train", **kw)


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
    skip_bad: bool = False,
) -> CalibrationSet:
    """Draw ``num_images`` images from ``source`` and normalize them for a model with config ``cfg``.

    Args:
        source: anything ``--data`` takes, a flat folder of images, or ``builtin``.
        cfg: the model's ``ModelCfg`` (input size, mean, std).
        num_images: how many images (all of them if the source has fewer).
        seed: picks which images.
        skip_bad: leave out images that cannot be read (listed in ``skipped``), drawing others in their place;
            without it the first one is a one-line ``DataError``.

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
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(total, size=count, replace=False))
    loaded, skipped = _load(dataset, index, skip_bad)
    if skipped:
        # Replacements come from the images not drawn yet, in a seeded order: the same source gives the same set.
        rest = np.setdiff1d(np.arange(total), index)
        for i in rng.permutation(rest):
            if len(loaded) == count:
                break
            more, bad = _load(dataset, [i], skip_bad)
            loaded += more
            skipped += bad
    if not loaded:
        raise DataError(f"no image of calibration source {source!r} could be read (first: {skipped[0]})")
    batch = torch.stack(loaded)
    if tuple(batch.shape[1:]) != tuple(cfg.input_size):
        raise DataError(f"calibration images are {tuple(batch.shape[1:])}, the model takes {tuple(cfg.input_size)}")
    images = normalize(batch, cfg.mean, cfg.std).numpy()
    images = np.ascontiguousarray(images, dtype=np.float32)
    fingerprint = content_digest(str(images.shape), images.tobytes())
    return CalibrationSet(images=images, source=str(source), fingerprint=fingerprint, skipped=skipped)


def _load(dataset, index, skip_bad: bool) -> tuple[list[torch.Tensor], list[str]]:
    """The images at ``index`` that could be read, and ``"<why>"`` for each one that could not (``skip_bad``)."""
    images, skipped = [], []
    for i in index:
        try:
            images.append(dataset[int(i)][0])
        except DataError as exc:
            # The readers end their messages with "; <advice>" for their own callers (skip_bad=True); keep what
            # is wrong, and give the advice that fits here.
            problem = str(exc).rsplit("; ", 1)[0]
            if not skip_bad:
                raise DataError(
                    f"{problem}; replace or remove it, or pass --skip-bad to leave such images out"
                ) from None
            skipped.append(problem)
    return images, skipped
