"""insightface / MXNet RecordIO (``train.rec`` + ``train.idx``), read and written without mxnet.

Layout (reference/face.md §4.1): ``train.idx`` holds ``key<TAB>offset`` lines; ``train.rec`` is a stream of chunks
``uint32 magic 0xCED7230A, uint32 lrec, payload, zero padding to 4 bytes`` where ``lrec`` packs a 29-bit length and a
3-bit continuation flag. A payload that contains the magic word at a 4-aligned offset is stored split at those words
(flag 1 first, 2 middle, 3 last) and the reader re-inserts the magic between the parts. Each record payload starts
with the 24-byte ``IRHeader`` ``<IfQQ`` (flag, label, id, id2); ``flag > 0`` means ``flag`` float32 labels follow.
In the insightface layout record 0 is a header with label ``[N+1, N+1+K]``, images are keys ``1..N`` and identity
records ``N+1..N+K`` hold each class's ``[start, end)`` key range.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from edgekd.atomic import atomic_path
from edgekd.data.image_folder import ImageFolder
from edgekd.errors import DataError
from edgekd.utils.hashing import content_digest

__all__ = [
    "MAGIC",
    "IRHeader",
    "RecordIODataset",
    "RecordWriter",
    "pack_record",
    "unpack_record",
    "encode_chunks",
    "pack_image_folder",
    "decode_image",
    "encode_image_file",
    "read_index",
]

MAGIC = 0xCED7230A
MAX_RECORD = 1 << 29
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_CHUNK = struct.Struct("<II")
_IRHEADER = struct.Struct("<IfQQ")
_HEADER_PREFIX = 256  # bytes read when only the IRHeader is needed
# Class ids are stored as float32, which holds every integer only up to 2^24; a larger label is damage.
MAX_CLASS_ID = 1 << 24
_INDEX_LIMIT = np.iinfo(np.int64).max  # np.fromstring saturates a number too large for int64 to this value
_RECORD_HINT = "pass skip_bad=True to drop damaged records (edgekd data verify lists them all) or re-pack the file"
_HEADER_HINT = "the header record 0 is damaged; re-pack the dataset (edgekd data pack) or re-download it"
_INDEX_HINT = "the index is damaged; re-download or re-create it with the .rec file"


class IRHeader(NamedTuple):
    """The header at the start of every record payload; ``label`` is a float or a tuple of floats."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


def pack_record(label: float | Sequence[float], body: bytes = b"", id: int = 0, id2: int = 0) -> bytes:
    """An IRHeader (flag = number of labels for an array, 0 for a scalar) followed by ``body``."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        return _IRHEADER.pack(0, float(label), id, id2) + body
    labels = np.asarray(label, dtype="<f4").ravel()
    return _IRHEADER.pack(len(labels), 0.0, id, id2) + labels.tobytes() + body


def unpack_record(payload: bytes) -> tuple[IRHeader, bytes]:
    """Split a record payload into its IRHeader and body; raises ``ValueError`` when it is too short."""
    if len(payload) < _IRHEADER.size:
        raise ValueError(f"record payload has {len(payload)} bytes, shorter than the 24-byte IRHeader")
    flag, label, id_, id2 = _IRHEADER.unpack_from(payload)
    start = _IRHEADER.size
    if flag > 0:
        end = start + 4 * flag
        if len(payload) < end:
            raise ValueError(f"IRHeader announces {flag} labels but the payload ends after {len(payload)} bytes")
        label = tuple(float(v) for v in np.frombuffer(payload, "<f4", flag, start))
        start = end
    return IRHeader(flag, label, id_, id2), payload[start:]


def encode_chunks(payload: bytes) -> bytes:
    """Frame one record the way dmlc does: split at each 4-aligned magic word, which is dropped, then pad to 4 bytes."""
    if len(payload) >= MAX_RECORD:
        raise DataError(f"a record of {len(payload)} bytes exceeds the RecordIO limit of 2^29 bytes")
    view = memoryview(payload)
    words = np.frombuffer(view[: len(payload) // 4 * 4], "<u4")
    out, start = [], 0
    for pos in (np.flatnonzero(words == MAGIC) * 4).tolist():
        out += [_CHUNK.pack(MAGIC, ((1 if start == 0 else 2) << 29) | (pos - start)), view[start:pos]]
        start = pos + 4
    out += [_CHUNK.pack(MAGIC, ((3 if start else 0) << 29) | (len(payload) - start)), view[start:]]
    out.append(b"\0" * (-len(payload) % 4))
    return b"".join(out)


class RecordWriter:
    """Writes records to ``.rec`` (and their offsets to ``.idx``); files appear under their names only on ``close``.

    Args:
        rec_path: the ``.rec`` file to write.
        idx_path: the index file; default ``rec_path`` with suffix ``.idx``.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        self._contexts = [atomic_path(self.rec_path), atomic_path(self.idx_path)]
        rec_tmp, idx_tmp = (c.__enter__() for c in self._contexts)
        self._rec, self._idx = open(rec_tmp, "w+b"), open(idx_tmp, "w")  # readable: overwrite checks what it replaces
        self._offset = 0

    def write(self, key: int, payload: bytes) -> int:
        """Append one record under ``key``; returns its byte offset. ``payload`` is the full IRHeader + body."""
        data = encode_chunks(bytes(payload))
        offset = self._offset
        self._rec.write(data)
        self._idx.write(f"{int(key)}\t{offset}\n")
        self._offset += len(data)
        return offset

    def overwrite(self, offset: int, payload: bytes) -> None:
        """Replace the record written at ``offset`` by a payload of the same length, e.g. a header whose counts are
        known only after the images are written. Both must be single-chunk records (no magic word inside)."""
        data = encode_chunks(bytes(payload))
        self._rec.seek(offset)
        magic, lrec = _CHUNK.unpack(self._rec.read(_CHUNK.size))
        if magic != MAGIC or lrec != len(payload) or len(data) != _CHUNK.size + len(payload) + (-len(payload) % 4):
            raise ValueError(f"overwrite at byte {offset} needs a single-chunk record of {len(payload)} bytes there")
        self._rec.seek(offset)
        self._rec.write(data)
        self._rec.seek(0, os.SEEK_END)

    def close(self, ok: bool = True) -> None:
        """Finish the files: renamed into place when ``ok``, deleted otherwise."""
        if self._rec.closed:
            return
        self._rec.close()
        self._idx.close()
        abort = DataError("record writing aborted")
        for c in self._contexts:  # atomic_path renames on a clean exit and deletes the temporary file otherwise
            c.__exit__(*((None, None, None) if ok else (DataError, abort, None)))

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def _resolve(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    rec = path / "train.rec" if path.is_dir() else path
    idx = rec.with_suffix(".idx")
    for p in (rec, idx):
        if not p.is_file():
            raise DataError(f"RecordIO file {p} not found (give a .rec file or a folder with train.rec + train.idx)")
    return rec, idx


def read_index(idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Keys and byte offsets from a ``.idx`` file, in file order, as int64 arrays (both checked non-negative)."""
    text = idx_path.read_bytes()
    flat = _parse_index_fast(text)
    lines = sum(1 for line in text.splitlines() if line.strip())
    if flat is None or len(flat) != 2 * lines or (len(flat) and not 0 <= flat.min() <= flat.max() < _INDEX_LIMIT):
        _raise_bad_index_line(idx_path, text)
    if not len(flat):
        raise DataError(f"{idx_path}: the index is empty; {_INDEX_HINT}")
    return flat[0::2].copy(), flat[1::2].copy()


def _parse_index_fast(text: bytes) -> np.ndarray | None:
    """All numbers of the index, parsed in C (millions of lines for the large face sets); None if that fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
            return np.fromstring(text.decode("ascii"), dtype=np.int64, sep=" ")
        except (DeprecationWarning, ValueError, UnicodeDecodeError):
            return None


def _raise_bad_index_line(idx_path: Path, text: bytes) -> None:
    """Find the first line that is not ``key<TAB>offset`` with integers in [0, 2^63) and raise naming it."""
    for n, line in enumerate(text.decode("utf-8", "replace").splitlines(), 1):
        parts = line.split()
        if parts and (len(parts) != 2 or not all(p.isascii() and p.isdigit() and int(p) < _INDEX_LIMIT for p in parts)):
            raise DataError(f"{idx_path}: line {n} is not 'key<TAB>offset' (two integers >= 0): "
                            f"{line.strip()[:60]!r}; {_INDEX_HINT}")  # fmt: skip
    raise DataError(f"{idx_path}: cannot parse the index; {_INDEX_HINT}")


class _RecFile:
    """Random access to one ``.rec`` file; the descriptor is opened lazily per process, so forked workers never share
    one, and it is dropped when pickled (spawned workers)."""

    def __init__(self, path: Path) -> None:
        self.path, self.size = path, path.stat().st_size
        self._fd, self._pid = None, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)

    def _pread(self, n: int, offset: int) -> bytes:
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return os.pread(self._fd, n, offset)

    def read(self, key: int, offset: int, prefix: int | None = None) -> tuple[bytes, int]:
        """The payload of the record at ``offset``, its chunks joined, and its full length.

        With ``prefix`` only about the first ``prefix`` bytes are read (the framing of the whole record is still
        checked), which is enough for the IRHeader. Raises ``DataError`` naming file, key and offset.
        """
        where = f"{self.path}: record {key} at byte {offset}"
        if not 0 <= offset < self.size:
            raise _damaged(where, f"the index points past the end of the file ({self.size} bytes)")
        parts, pos, total = [], offset, 0
        while True:
            head = self._pread(8, pos)
            if len(head) < 8:
                raise _damaged(where, f"truncated, the file ends inside a chunk header at byte {self.size}")
            magic, lrec = _CHUNK.unpack(head)
            if magic != MAGIC:
                raise _damaged(where, f"bad magic word 0x{magic:08X} at byte {pos} (expected 0x{MAGIC:08X})")
            cflag, length = lrec >> 29, lrec & (MAX_RECORD - 1)
            if cflag not in ((0, 1) if not parts else (2, 3)):
                raise _damaged(where, f"continuation flag {cflag} out of sequence at byte {pos}")
            if pos + 8 + length > self.size:
                raise _damaged(where, f"truncated, {length} payload bytes announced but the file ends at byte "
                                      f"{self.size}")  # fmt: skip
            want = length if prefix is None else max(0, min(length, prefix - total))
            data = self._pread(want, pos + 8) if want else b""
            if len(data) < want:
                raise _damaged(where, f"truncated, the file ends at byte {self.size}")
            parts.append(data)
            total += length + (4 if len(parts) > 1 else 0)
            pos += 8 + length + (-length % 4)
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts), total


def _damaged(where: str, problem: str) -> DataError:
    """The error for one damaged record: where it is, what is wrong, and how to go on."""
    return DataError(f"{where}: {problem}; {_RECORD_HINT}")


def _class_of(label: float | tuple[float, ...]) -> float:
    return label[0] if isinstance(label, tuple) else label


def _image_failure(exc: Exception) -> str:
    """Why PIL could not read an image, in a few words (PIL's own message for an unknown format names a BytesIO)."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a known image format"
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def decode_image(body: bytes, size: int | None, where: str, hint: str = _RECORD_HINT) -> torch.Tensor:
    """Decode encoded image bytes to uint8 RGB ``(3, H, W)``, resized (bilinear) to ``size``² when given.

    Raises ``DataError`` ``"<where>: cannot decode the image (<why>); <hint>"``.
    """
    try:
        with Image.open(io.BytesIO(body)) as img:
            img.load()
            img = img if img.mode == "RGB" else img.convert("RGB")
            if size and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            arr = np.asarray(img)
    # Damaged bytes make PIL's decoders fail with nearly any exception type (struct.error, IndexError, MemoryError
    # from a size field, ...): every one of them means this image cannot be read.
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{where}: cannot decode the image ({_image_failure(exc)}); {hint}") from None
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # numpy's transpose copy is faster


class RecordIODataset(Dataset):
    """insightface ``train.rec`` + ``train.idx`` as a Dataset of ``(image: uint8 (3, S, S), label: int)``.

    With an insightface header (record 0, flag > 0, empty body) the images are keys ``1 .. label[0]-1`` and
    ``num_classes = label[1] - label[0]``; otherwise (a plain im2rec file) every key of the index is an image, in
    index order, and ``num_classes`` is the largest label + 1 (found by a header scan when first asked for).

    Args:
        path: a ``.rec`` file (its ``.idx`` beside it) or a folder with ``train.rec`` and ``train.idx``.
        image_size: side ``S`` to resize to; default the size of the first image.
        skip_bad: drop unreadable records instead of raising. A header pass over the file (framing, IRHeader, label
            range) runs on first use; images that fail to decode later are replaced by the next good record. Both
            are counted in ``skipped`` (per process); ``verify(decode_images=True)`` finds every bad record up front.
    """

    channels = 3

    def __init__(self, path: str | os.PathLike, image_size: int | None = None, skip_bad: bool = False) -> None:
        self.rec_path, self.idx_path = _resolve(path)
        self.skip_bad, self.skipped = bool(skip_bad), 0
        keys, offsets = read_index(self.idx_path)
        order = np.argsort(keys, kind="stable")  # sorted arrays, not a dict: 16 bytes per record at any scale
        self._idx_keys, self._idx_offsets = keys[order], offsets[order]
        self._file = _RecFile(self.rec_path)
        st = self.rec_path.stat()
        self.fingerprint = content_digest(self.idx_path.read_bytes(), f"|{st.st_size}|{st.st_mtime_ns}")
        self._num_classes: int | None = None
        self.keys = keys
        if self._offset_of(0) is not None:
            header, _, size = self._header(0, prefix=_HEADER_PREFIX)
            if header.flag > 0 and len(header.label) >= 2 and size == _IRHEADER.size + 4 * header.flag:
                lo, hi = self._header_key_range(header)
                self.keys = np.arange(1, lo, dtype=np.int64)
                self._num_classes = hi - lo
                missing = self.keys[~np.isin(self.keys, self._idx_keys)]
                if len(missing) and not self.skip_bad:
                    raise DataError(f"{self.idx_path}: image record {missing[0]} named by the header is not indexed; "
                                    f"{_RECORD_HINT}")  # fmt: skip
        if not len(self.keys):
            raise DataError(f"{self.rec_path}: holds no image records; check that it is the dataset you meant")
        self._labels: torch.Tensor | None = None
        self._valid: np.ndarray | None = None
        if not self.skip_bad:
            self._valid = np.arange(len(self.keys))
        self.image_size = int(image_size) if image_size else None
        if self.image_size is None:
            self.image_size = self._native_size()

    def _header_key_range(self, header: IRHeader) -> tuple[int, int]:
        """``(lo, hi)`` of an insightface header (images ``1..lo-1``, identities ``lo..hi-1``), checked before
        anything is sized from them: a damaged label of NaN or 1e11 must not become an array of 1e11 keys."""
        lo, hi = header.label[0], header.label[1]
        where = f"{self.rec_path}: header record 0 (label [{lo}, {hi}])"
        if not all(math.isfinite(v) and v == int(v) for v in (lo, hi)):
            raise DataError(f"{where}: the image and identity key bounds are not integers; {_HEADER_HINT}")
        lo, hi = int(lo), int(hi)
        others = len(self._idx_keys) - 1  # indexed records besides the header
        # Every image is an indexed record, and so is every identity (its identity record or its images): in a sound
        # file neither count exceeds the index, and a class id must stay exact in float32.
        if not (1 <= lo <= others + 1 and 0 <= hi - lo <= min(others, MAX_CLASS_ID)):
            raise DataError(f"{where}: names {lo - 1} images and {hi - lo} identities but {self.idx_path} lists "
                            f"{others} records besides the header; the header or the index is damaged, re-pack the "
                            f"dataset (edgekd data pack) or re-download it")  # fmt: skip
        return lo, hi

    def _offset_of(self, key: int) -> int | None:
        i = int(np.searchsorted(self._idx_keys, key))
        return int(self._idx_offsets[i]) if i < len(self._idx_keys) and self._idx_keys[i] == key else None

    def _where(self, key: int) -> str:
        return f"{self.rec_path}: record {key} at byte {self._offset_of(key)}"

    def _header(self, key: int, prefix: int | None = None) -> tuple[IRHeader, bytes, int]:
        """IRHeader, body (only its start with ``prefix``) and full payload length of record ``key``."""
        offset = self._offset_of(key)
        if offset is None:
            raise DataError(f"{self.idx_path}: record {key} is not in the index; {_RECORD_HINT}")
        payload, size = self._file.read(key, offset, prefix)
        try:
            header, body = unpack_record(payload)
        except ValueError as exc:
            if prefix is not None and len(payload) < size:  # a header longer than the prefix
                return self._header(key)
            raise _damaged(self._where(key), str(exc)) from None
        return header, body, size

    def read_record(self, key: int) -> tuple[IRHeader, bytes]:
        """The IRHeader and body of the record stored under ``key`` (header, image or identity record)."""
        header, body, _ = self._header(int(key))
        return header, body

    def _native_size(self) -> int:
        for key in self.keys[:64].tolist():
            try:
                return int(decode_image(self._header(key)[1], None, self._where(key)).shape[1])
            except DataError:
                if not self.skip_bad:
                    raise
        raise DataError(f"{self.rec_path}: none of the first records holds a readable image; the file is damaged, "
                        f"re-pack or re-download it")  # fmt: skip

    @property
    def num_classes(self) -> int:
        """Number of classes: from the header record, else the largest label + 1."""
        if self._num_classes is None:
            labels = self.labels
            self._num_classes = int(labels.max()) + 1 if len(labels) else 0
        return self._num_classes

    @property
    def labels(self) -> torch.Tensor:
        """Class of every (kept) image, int64 ``(N,)``; reads every record's header once and caches it."""
        if self._labels is None:
            self._ensure_valid()
            keys = self._kept_keys()
            labels = [self._check_label(k, self._header(k, _HEADER_PREFIX)[0]) for k in keys]
            self._labels = torch.tensor(labels, dtype=torch.int64)
        return self._labels

    def _kept_keys(self) -> list[int]:
        return self.keys[self._valid].tolist()

    def _check_label(self, key: int, header: IRHeader) -> int:
        """The record's class id; an integer in ``[0, num_classes)`` (header) or ``[0, 2^24)`` (plain file)."""
        value = _class_of(header.label)
        bound = self._num_classes if self._num_classes is not None else MAX_CLASS_ID
        if not (math.isfinite(value) and value == int(value) and 0 <= value < bound):
            bound_text = f"[0, {bound})" if self._num_classes is not None else "[0, 2^24) (integers exact in float32)"
            raise _damaged(self._where(key), f"label {value} is not in {bound_text}")
        return int(value)

    def verify(self, decode_images: bool = False) -> list[str]:
        """Check every record (framing, IRHeader, label range, and the image when ``decode_images``).

        With ``skip_bad`` the bad records are dropped from the dataset and counted in ``skipped``; without it the
        first bad record raises. Returns one message per bad record.
        """
        problems, good = [], []
        for i, key in enumerate(self.keys.tolist()):
            try:
                header, body, _ = self._header(key, None if decode_images else _HEADER_PREFIX)
                self._check_label(key, header)
                if decode_images:
                    decode_image(body, None, self._where(key))
                good.append(i)
            except DataError as exc:
                if not self.skip_bad:
                    raise
                problems.append(str(exc))
        self._valid = np.asarray(good, dtype=np.int64)
        self._labels = None
        self.skipped = len(problems)
        if problems:
            warnings.warn(f"skipped {len(problems)} bad records of {self.rec_path}; first: {problems[0]}", stacklevel=2)
        return problems

    def _ensure_valid(self) -> None:
        if self._valid is None:
            self.verify(decode_images=False)

    def __len__(self) -> int:
        self._ensure_valid()
        return len(self._valid)

    def _load(self, key: int) -> tuple[torch.Tensor, int]:
        header, body, _ = self._header(key)
        label = self._check_label(key, header)
        return decode_image(body, self.image_size, self._where(key)), label

    def encoded(self, index: int) -> tuple[bytes, int]:
        """The stored (still encoded) image bytes of item ``index`` and its label, for decoders elsewhere (GPU)."""
        self._ensure_valid()
        key = int(self.keys[self._valid[index]])
        header, body, _ = self._header(key)
        return body, self._check_label(key, header)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for step in range(n):
            key = int(self.keys[self._valid[(index + step) % n]])
            try:
                return self._load(key)
            except DataError:
                if not self.skip_bad:
                    raise
                self.skipped += 1
        raise DataError(f"{self.rec_path}: no record could be read; the file is damaged, re-pack or re-download it")


def encode_image_file(path: Path, quality: int = 95, hint: str = "replace or remove it") -> bytes:
    """The bytes to store for an image file: RGB JPEGs as they are, anything else re-encoded as JPEG ``quality``.

    Raises ``DataError`` ``"<path>: cannot read the image (<why>); <hint>"`` (no ``; <hint>`` when ``hint`` is empty).
    """
    try:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as img:
            if img.format == "JPEG" and img.mode == "RGB":
                img.load()
                return raw
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=quality)
            return buf.getvalue()
    # As in decode_image: a damaged file can make PIL fail with nearly any exception type.
    except Exception as exc:  # noqa: BLE001
        advice = f"; {hint}" if hint else ""
        raise DataError(f"{path}: cannot read the image ({_image_failure(exc)}){advice}") from None


def pack_image_folder(
    folder: str | os.PathLike, out_dir: str | os.PathLike, quality: int = 95, skip_bad: bool = False
) -> dict:
    """Pack an image folder (``root/<class>/**/<image>``, classes as ``ImageFolder`` numbers them) into RecordIO.

    Writes ``out_dir/train.rec`` and ``out_dir/train.idx``: header record 0 (label ``[N+1, N+1+K]``), images at
    keys ``1..N`` with label ``[class, 0]``, identity records ``N+1..N+K`` with label ``[start, end)``. Both files
    are written under temporary names and renamed only when packing succeeds: after an error no output is left
    (and ``out_dir`` is removed again if this call created it).

    Args:
        skip_bad: leave out images that cannot be read (each listed in ``skipped``) instead of raising ``DataError``
            at the first one. Classes keep their numbers even if all their images are left out.

    Returns:
        dict with ``rec``, ``idx``, ``images`` (packed), ``classes`` and ``skipped`` (``"<path>: <why>"`` per image).
    """
    # The folder reader's listing, so packed class ids equal ImageFolder's; image_size only skips its square check.
    listing = ImageFolder(folder, image_size=1)
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    try:
        return _write_packed(listing, out_dir, quality, skip_bad)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # not empty: someone else wrote there meanwhile; leave it
                out_dir.rmdir()
        raise


def _write_packed(listing, out_dir: Path, quality: int, skip_bad: bool) -> dict:
    """``pack_image_folder`` for an ``ImageFolder`` listing: images as they read well, then the header's counts."""
    k = len(listing.classes)
    labels, skipped = [], []
    hint = "" if skip_bad else "replace or remove it, or pack with --skip-bad (skip_bad=True) to leave such images out"
    with RecordWriter(out_dir / "train.rec", out_dir / "train.idx") as writer:
        header_at = writer.write(0, pack_record([1, 1 + k]))  # same size as the real header, written once N is known
        for path, cls in listing.samples:
            try:
                body = encode_image_file(path, quality, hint)
            except DataError as exc:
                if not skip_bad:
                    raise
                skipped.append(str(exc))
                continue
            labels.append(cls)
            writer.write(len(labels), pack_record([cls, 0], body))
        n = len(labels)
        if not n:
            raise DataError(f"none of the {len(skipped)} images under {listing.root} could be read (first: "
                            f"{skipped[0]}); nothing was written")  # fmt: skip
        writer.overwrite(header_at, pack_record([n + 1, n + 1 + k]))
        starts = np.searchsorted(np.asarray(labels), np.arange(k + 1)) + 1  # samples are sorted by class
        for cls in range(k):
            writer.write(n + 1 + cls, pack_record([starts[cls], starts[cls + 1]]))
    rec, idx = out_dir / "train.rec", out_dir / "train.idx"
    return {"rec": str(rec), "idx": str(idx), "images": n, "classes": k, "skipped": skipped}
