"""One folder per class (or identity): ``root/<class>/**/<image>``; sorted class names give the labels 0..C-1."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from edgekd.data.image_bytes import to_8bit
from edgekd.errors import DataError
from edgekd.utils.hashing import content_digest

__all__ = ["ImageFolder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")


def _decode(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """Decode one file to ``(H, W, C)`` uint8 in ``mode`` (``RGB``/``L``), resized (bilinear) to ``size``."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = to_8bit(img, mode)
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.array(img, dtype=np.uint8)  # a writable copy
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot decode image {path}: {e}; remove or replace it, or pass --skip-bad") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


class ImageFolder(Dataset):
    """Images under ``root/<class>/`` (searched recursively); yields ``(image: uint8 (C, S, S), label: int)``.

    Images are decoded lazily with PIL, converted to RGB (``channels=3``) or L (``channels=1``) and resized to
    ``image_size``. Without ``image_size`` the first image's side is used (it must be square) and others are resized
    to it.

    Args:
        root: the folder holding one subfolder per class.
        image_size: output side ``S`` in pixels.
        channels: 3 (RGB) or 1 (grayscale).
        skip_bad: decode every file once at construction and drop the ones that fail (their number is in
            ``skipped``, their paths in ``bad_files``); otherwise a corrupt file raises ``DataError`` when read.
        extensions: file name endings counted as images (case-insensitive).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int | None = None,
        channels: int = 3,
        skip_bad: bool = False,
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist; pass a folder with one subfolder per class")
        if channels not in (1, 3):
            raise DataError(f"channels={channels} must be 1 or 3")
        self.channels = channels
        self._mode = "RGB" if channels == 3 else "L"
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        exts = tuple(e.lower() for e in extensions)
        samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            for dirpath, dirnames, filenames in os.walk(self.root / name, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                samples += [
                    (Path(dirpath) / f, label)
                    for f in sorted(filenames)
                    if f.lower().endswith(exts) and not f.startswith(".")
                ]
        if not samples:
            raise DataError(
                f"no images ({', '.join(exts)}) found in class subfolders of {self.root}; expected root/<class>/<image>"
            )
        self.bad_files: list[str] = []
        if image_size is None:
            image_size = self._first_size(samples)
        self.image_size = int(image_size)
        self._size = (self.image_size, self.image_size)
        if skip_bad:
            good = []
            for path, label in samples:
                try:
                    _decode(path, self._mode, None)
                    good.append((path, label))
                except DataError:
                    self.bad_files.append(str(path))
            samples = good
            if not samples:
                raise DataError(f"every image under {self.root} failed to decode")
        self.skipped = len(self.bad_files)
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.num_classes = len(self.classes)
        self.fingerprint = self._fingerprint()

    def _first_size(self, samples: list[tuple[Path, int]]) -> int:
        """Side of the first decodable image; it must be square."""
        from PIL import Image

        for path, _ in samples:
            try:
                with Image.open(path) as img:
                    w, h = img.size
            except (OSError, ValueError, SyntaxError):
                continue
            if w != h:
                raise DataError(f"first image {path} is {w}x{h}, not square; pass image_size to resize all images")
            return w
        raise DataError(f"no readable image under {self.root}")

    def _fingerprint(self) -> str:
        """Hash of the sorted relative paths, sizes, modification times, labels and the output format."""

        def files():
            for path, label in self.samples:
                st = path.stat()
                yield f"{path.relative_to(self.root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n"

        return content_digest(f"image-folder:v1:{self.image_size}:{self.channels}", files(), algorithm="sha1")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        arr = _decode(path, self._mode, self._size)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), label
