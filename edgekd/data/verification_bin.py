"""insightface verification ``.bin`` pair sets (lfw.bin, cfp_fp.bin, agedb_30.bin, ...), read and written.

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``2P`` encoded images (JPEG/PNG bytes, aligned 112×112) where
images ``2i`` and ``2i + 1`` form pair ``i``, and ``P`` booleans (reference/face.md §4.2). The files come from
Python 2, so strings load as bytes. Unpickling is restricted to the few types these files hold, so a ``.bin`` from
the internet cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edgekd.atomic import atomic_path
from edgekd.data.pairs import PairSet
from edgekd.data.recordio import decode_image
from edgekd.errors import DataError

__all__ = ["load_bin", "write_bin"]

_ALLOWED = {
    ("builtins", "bool"),
    ("builtins", "bytearray"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy", "bool_"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
}


class _BinUnpickler(pickle.Unpickler):
    """Loads only containers, bytes, booleans and numpy arrays/scalars."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _as_bytes(item: object) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    raise TypeError(f"expected encoded image bytes, got {type(item).__name__}")


def load_bin(path: str | os.PathLike, image_size: int | None = None) -> PairSet:
    """Read a verification ``.bin`` into a ``PairSet`` of uint8 RGB images ``(2P, 3, S, S)`` and ``P`` labels.

    Args:
        path: the ``.bin`` file.
        image_size: side ``S`` to resize to (bilinear); default the size of the first image.

    Returns:
        ``PairSet`` named after the file stem (``lfw``, ``cfp_fp``, ...), fingerprinted by the file's SHA-256.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"verification file {path} not found")
    raw = path.read_bytes()
    try:
        obj = _BinUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # a corrupt pickle raises any of a dozen types
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a verification .bin pickle ({msg})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise DataError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame = obj
    try:
        bins, issame = list(bins), [bool(v) for v in issame]
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: bins and issame_list must be sequences ({exc})") from None
    _check_counts(path, len(bins), len(issame))
    images, size = [], image_size
    for i, item in enumerate(bins):
        where = f"{path}: image {i} (pair {i // 2})"
        try:
            data = _as_bytes(item)
        except TypeError as exc:
            raise DataError(f"{where}: {exc}") from None
        img = decode_image(data, size, where)
        if size is None:
            size = int(img.shape[1])
            img = decode_image(data, size, where) if img.shape[1] != img.shape[2] else img
        images.append(img)
    fingerprint = hashlib.sha256(raw).hexdigest()[:16] + (f"-{size}" if image_size else "")
    return PairSet(torch.stack(images), np.asarray(issame, dtype=bool), path.stem, fingerprint)


def _check_counts(path: Path | str, n_images: int, n_pairs: int) -> None:
    if n_images % 2:
        raise DataError(f"{path}: odd image count {n_images}; pairs are images 2i and 2i+1")
    if n_images != 2 * n_pairs:
        raise DataError(f"{path}: {n_images} images but {n_pairs} issame labels (expected 2 images per label)")
    if n_pairs == 0:
        raise DataError(f"{path}: holds no pairs")


def _encode(img: np.ndarray, image_format: str, quality: int) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    pil.save(buf, format=image_format.upper(), **({"quality": quality} if image_format.lower() == "jpeg" else {}))
    return buf.getvalue()


def write_bin(
    path: str | os.PathLike,
    images: torch.Tensor | np.ndarray | Sequence[bytes],
    issame: Sequence[bool] | torch.Tensor | np.ndarray,
    image_format: str = "jpeg",
    quality: int = 95,
) -> Path:
    """Write a verification ``.bin`` (atomically) that insightface's loader and ``load_bin`` read.

    Args:
        path: output file.
        images: uint8 ``(2P, C, H, W)`` images (encoded as ``image_format``) or ``2P`` already encoded byte strings.
        issame: ``P`` booleans; pair ``i`` is images ``2i`` and ``2i + 1``.
        image_format: ``jpeg`` (as the published files) or ``png`` (lossless).
        quality: JPEG quality.

    Returns:
        The path written.
    """
    path = Path(path)
    labels = [bool(v) for v in (issame.tolist() if hasattr(issame, "tolist") else issame)]
    if isinstance(images, (torch.Tensor, np.ndarray)):
        arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if arr.dtype != np.uint8 or arr.ndim != 4:
            raise DataError(f"{path}: write_bin needs uint8 (2P, C, H, W) images, got {arr.dtype} {arr.shape}")
        _check_counts(path, len(arr), len(labels))
        bins = [_encode(np.ascontiguousarray(img.transpose(1, 2, 0)), image_format, quality) for img in arr]
    else:
        bins = [_as_bytes(b) for b in images]
        _check_counts(path, len(bins), len(labels))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump((bins, labels), f, protocol=4)
    return path
