"""insightface verification ``.bin`` pair sets (lfw.bin, cfp_fp.bin, agedb_30.bin, ...), read and written.

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``2P`` encoded images (JPEG/PNG bytes, aligned 112×112) where
images ``2i`` and ``2i + 1`` form pair ``i``, and ``P`` booleans (reference/face.md §4.2). The files come from
Python 2, so strings load as bytes. Unpickling is restricted to the few types these files hold, so a ``.bin`` from
the internet cannot run code; its opcodes are checked first, so no length or memo index in the file makes the
unpickler allocate more than the file holds.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edgekd.atomic import atomic_path
from edgekd.data.pairs import PairSet
from edgekd.data.recordio import decode_image
from edgekd.errors import DataError
from edgekd.utils.hashing import content_digest

__all__ = ["check_bin", "load_bin", "write_bin"]

_HINT = "re-download the file or re-create it (edgekd data pack-bin)"
_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's pickled-array constructor, wherever this numpy keeps it


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` in a pickle: accepted as ``_reconstruct``'s first argument but refusing to be
    called, so a pickle cannot call ``ndarray(shape)`` to allocate an array of any size it names."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("refusing numpy.ndarray(...): arrays load only the way numpy pickles them")


_NDARRAY = _NdarrayToken()


def _bytes_of(data: bytes | bytearray = b"", encoding: str | None = None) -> bytes:
    """``bytes`` as protocol-2 pickles rebuild it (empty, or from bytes); never ``bytes(size)``."""
    if isinstance(data, (bytes, bytearray)) and encoding is None:
        return bytes(data)
    raise pickle.UnpicklingError("refusing bytes() from anything but bytes")


def _bytearray_of(data: bytes | bytearray | str = b"", encoding: str | None = None) -> bytearray:
    """``bytearray`` as pickles rebuild it (from bytes, or a latin-1 str from Python 2); never ``bytearray(size)``."""
    if isinstance(data, (bytes, bytearray)) and encoding is None:
        return bytearray(data)
    if isinstance(data, str) and encoding in ("latin-1", "latin1"):
        return bytearray(data, "latin-1")
    raise pickle.UnpicklingError("refusing bytearray() from anything but bytes")


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles from Python 3 use it for bytes (latin-1 only: no other codec runs)."""
    if isinstance(text, str) and encoding in ("latin-1", "latin1") and errors == "strict":
        return text.encode("latin-1")
    raise pickle.UnpicklingError(f"refusing _codecs.encode with {encoding!r}")


def _number_dtype(spec: object, align: bool = False, copy: bool = False) -> np.dtype:
    """``numpy.dtype`` for booleans and numbers only: an object or void dtype would let ``ndarray.__setstate__``
    allocate as many object slots as the file claims before it checks the data behind them."""
    dtype = np.dtype(spec, bool(align), bool(copy))
    if dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"refusing numpy dtype {dtype} (only booleans and numbers)")
    return dtype


def _empty_array(subtype: object, shape: tuple, dtype: object) -> np.ndarray:
    """numpy's ``_reconstruct`` as numpy's own pickles call it: an empty ndarray, which BUILD then fills."""
    if subtype is not _NDARRAY or tuple(shape) != (0,):
        raise pickle.UnpicklingError("refusing an array that is not rebuilt the way numpy pickles one")
    return _RECONSTRUCT(np.ndarray, (0,), dtype)


# Everything a .bin may name: plain types, numpy's scalar as it is, and guarded stand-ins for the callables that
# could allocate any size or run a codec.
_GLOBALS = {
    ("builtins", "bool"): bool,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytes"): _bytes_of,
    ("builtins", "bytearray"): _bytearray_of,
    ("_codecs", "encode"): _latin1_encode,  # how protocol-2 pickles written by Python 3 store bytes
    ("numpy", "dtype"): _number_dtype,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "bool_"): np.bool_,
    ("numpy.core.multiarray", "scalar"): None,  # None: loaded as is
    ("numpy._core.multiarray", "scalar"): None,
    ("numpy.core.multiarray", "_reconstruct"): _empty_array,
    ("numpy._core.multiarray", "_reconstruct"): _empty_array,
}
# Opcodes that store into the memo at an index given in the file; the unpickler sizes its memo table from it.
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


class _BinUnpickler(pickle.Unpickler):
    """Loads only containers, bytes, booleans and numpy arrays/scalars."""

    def find_class(self, module: str, name: str):
        module = "builtins" if module == "__builtin__" else module  # Python 2's name, as fix_imports maps it
        if (module, name) not in _GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        stand_in = _GLOBALS[(module, name)]
        return super().find_class(module, name) if stand_in is None else stand_in


def _check_opcodes(raw: bytes) -> None:
    """Walk the pickle's opcodes before loading it: every argument must fit in the file (pickletools reads them
    without allocating what a length field claims) and memo indices must be small. The C unpickler would allocate
    a byte string of a claimed length before reading it, and a memo table as large as a claimed index.
    """
    for count, (op, arg, pos) in enumerate(pickletools.genops(raw)):
        if op.name in _MEMO_PUTS and not 0 <= int(arg) <= count:
            raise ValueError(f"memo index {arg} at byte {pos} exceeds the {count} opcodes before it")


def _unpickle(path: Path, raw: bytes) -> object:
    try:
        _check_opcodes(raw)
        return _BinUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 -- a damaged pickle raises any of a dozen types
        msg = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a verification .bin pickle ({msg}); {_HINT}") from None


def _as_bytes(item: object, limit: int | None = None) -> bytes:
    """An encoded image as bytes; ``limit`` bounds an array's size (read from a file, its data came from the file)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and (limit is None or item.nbytes <= limit):
        return item.tobytes()
    raise TypeError(f"expected encoded image bytes, got {type(item).__name__}")


def _is_flag(value: object) -> bool:
    """A pair label: a bool, or an integer 0 or 1 (Python or numpy)."""
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1))


def _pair_lists(path: Path, obj: object) -> tuple[list, list[bool]]:
    """``(bins, issame)`` from the unpickled object, their types checked."""
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise DataError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}; {_HINT}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) and not (isinstance(bins, np.ndarray) and bins.ndim == 1):
        raise DataError(f"{path}: bins is a {type(bins).__name__}, not a list of encoded images; {_HINT}")
    if not isinstance(issame, (list, tuple)) and not (isinstance(issame, np.ndarray) and issame.ndim == 1):
        raise DataError(f"{path}: issame_list is a {type(issame).__name__}, not a list of booleans; {_HINT}")
    for i, value in enumerate(issame):
        if not _is_flag(value):
            shown = f" {value!r}" if isinstance(value, (int, float, np.number)) else ""  # not a deep container's repr
            raise DataError(f"{path}: issame_list[{i}] is {type(value).__name__}{shown}, not a boolean; {_HINT}")
    return list(bins), [bool(v) for v in issame]


def load_bin(path: str | os.PathLike, image_size: int | None = None) -> PairSet:
    """Read a verification ``.bin`` into a ``PairSet`` of uint8 RGB images ``(2P, 3, S, S)`` and ``P`` labels.

    Args:
        path: the ``.bin`` file.
        image_size: side ``S`` to resize to (bilinear); default the size of the first image.

    Returns:
        ``PairSet`` named after the file stem (``lfw``, ``cfp_fp``, ...), fingerprinted by the file's SHA-256.
    """
    path = Path(path)
    raw, bins, issame = _read(path)
    images, size = [], image_size
    for i, item in enumerate(bins):
        img = _decode_item(path, raw, i, item, size)
        if size is None:
            size = int(img.shape[1])
            img = _decode_item(path, raw, i, item, size) if img.shape[1] != img.shape[2] else img
        images.append(img)
    fingerprint = content_digest(raw) + (f"-{size}" if image_size else "")
    return PairSet(torch.stack(images), np.asarray(issame, dtype=bool), path.stem, fingerprint)


def check_bin(path: str | os.PathLike) -> int:
    """Check a verification ``.bin`` without decoding all of it: it unpickles to ``(bins, issame_list)``, the counts
    agree and its first image decodes. Returns the number of pairs; a bad file is a one-line ``DataError``.

    A run checks its evaluation sets this way before training, so a broken file stops it in seconds, not at the end.
    """
    path = Path(path)
    raw, bins, issame = _read(path)
    _decode_item(path, raw, 0, bins[0], None)
    return len(issame)


def _read(path: Path) -> tuple[bytes, list, list[bool]]:
    """The file's bytes and its checked ``(bins, issame)`` lists."""
    if not path.is_file():
        raise DataError(f"verification file {path} not found")
    raw = path.read_bytes()
    bins, issame = _pair_lists(path, _unpickle(path, raw))
    _check_counts(path, len(bins), len(issame), _HINT)
    return raw, bins, issame


def _decode_item(path: Path, raw: bytes, i: int, item: object, size: int | None) -> torch.Tensor:
    where = f"{path}: image {i} (pair {i // 2})"
    try:
        data = _as_bytes(item, len(raw))
    except TypeError as exc:
        raise DataError(f"{where}: {exc}; {_HINT}") from None
    return decode_image(data, size, where, _HINT)


def _check_counts(path: Path | str, n_images: int, n_pairs: int, hint: str = "") -> None:
    advice = f"; {hint}" if hint else ""
    if n_images % 2:
        raise DataError(f"{path}: odd image count {n_images}; pairs are images 2i and 2i+1{advice}")
    if n_images != 2 * n_pairs:
        raise DataError(f"{path}: {n_images} images but {n_pairs} issame labels (expected 2 images per label){advice}")
    if n_pairs == 0:
        raise DataError(f"{path}: holds no pairs{advice}")


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
