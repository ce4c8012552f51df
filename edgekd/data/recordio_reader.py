"""Reading RecordIO records by key: the ``.rec`` / ``.idx`` pair a path names, the index, and one record's payload at
its offset with the chunk framing checked (``edgekd.data.recordio_format`` has the layout). ``RecordIODataset`` is
built on these; a damaged file is a one-line ``DataError`` naming file, key and offset.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from edgekd.data.recordio_format import CHUNK, MAGIC, MAGIC_BYTES, MAX_RECORD
from edgekd.errors import DataError

__all__ = ["RECORD_HINT", "RecordFile", "damaged", "read_index", "resolve_recordio"]

RECORD_HINT = "pass --skip-bad to leave damaged records out (edgekd data verify lists them all) or re-pack the file"
_INDEX_HINT = "the index is damaged; re-download or re-create it with the .rec file"
_INDEX_LIMIT = np.iinfo(np.int64).max  # np.fromstring saturates a number too large for int64 to this value


def resolve_recordio(path: str | os.PathLike) -> tuple[Path, Path]:
    """The ``.rec`` and ``.idx`` files of ``path``: a ``.rec`` file (its ``.idx`` beside it) or a folder with
    ``train.rec`` and ``train.idx``."""
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


class RecordFile:
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
            raise damaged(where, f"the index points past the end of the file ({self.size} bytes)")
        parts, pos, total = [], offset, 0
        while True:
            head = self._pread(8, pos)
            if len(head) < 8:
                raise damaged(where, f"truncated, the file ends inside a chunk header at byte {self.size}")
            magic, lrec = CHUNK.unpack(head)
            if magic != MAGIC:
                raise damaged(where, f"bad magic word 0x{magic:08X} at byte {pos} (expected 0x{MAGIC:08X})")
            cflag, length = lrec >> 29, lrec & (MAX_RECORD - 1)
            if cflag not in ((0, 1) if not parts else (2, 3)):
                raise damaged(where, f"continuation flag {cflag} out of sequence at byte {pos}")
            if pos + 8 + length > self.size:
                raise damaged(where, f"truncated, {length} payload bytes announced but the file ends at byte "
                                     f"{self.size}")  # fmt: skip
            want = length if prefix is None else max(0, min(length, prefix - total))
            data = self._pread(want, pos + 8) if want else b""
            if len(data) < want:
                raise damaged(where, f"truncated, the file ends at byte {self.size}")
            parts.append(data)
            total += length + (4 if len(parts) > 1 else 0)
            pos += 8 + length + (-length % 4)
            if cflag in (0, 3):
                return MAGIC_BYTES.join(parts), total


def damaged(where: str, problem: str) -> DataError:
    """The error for one damaged record: where it is, what is wrong, and how to go on."""
    return DataError(f"{where}: {problem}; {RECORD_HINT}")
