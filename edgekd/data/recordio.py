"""insightface / MXNet RecordIO (``train.rec`` + ``train.idx``) read as a Dataset without mxnet, and the RecordIO API
in one import.

``RecordIODataset`` lives here; the format's bytes in ``edgekd.data.recordio_format`` (chunk framing, ``IRHeader``),
reading records by key in ``edgekd.data.recordio_reader``, writing and packing in ``edgekd.data.recordio_writer``, the
stored images in ``edgekd.data.image_bytes``. Their public names are imported here too, so ``from edgekd.data.recordio
import ...`` reaches all of RecordIO.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from edgekd.data.image_bytes import decode_image, encode_image_file
from edgekd.data.recordio_format import IRHEADER, MAGIC, IRHeader, encode_chunks, pack_record, unpack_record
from edgekd.data.recordio_reader import RECORD_HINT, RecordFile, damaged, read_index, resolve_recordio
from edgekd.data.recordio_writer import RecordWriter, pack_image_folder
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

_HEADER_PREFIX = 256  # bytes read when only the IRHeader is needed
# Class ids are stored as float32, which holds every integer only up to 2^24; a larger label is damage.
MAX_CLASS_ID = 1 << 24
_HEADER_HINT = "the header record 0 is damaged; re-pack the dataset (edgekd data pack) or re-download it"


def _class_of(label: float | tuple[float, ...]) -> float:
    return label[0] if isinstance(label, tuple) else label


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
        self.rec_path, self.idx_path = resolve_recordio(path)
        self.skip_bad, self.skipped = bool(skip_bad), 0
        keys, offsets = read_index(self.idx_path)
        order = np.argsort(keys, kind="stable")  # sorted arrays, not a dict: 16 bytes per record at any scale
        self._idx_keys, self._idx_offsets = keys[order], offsets[order]
        self._file = RecordFile(self.rec_path)
        st = self.rec_path.stat()
        self.fingerprint = content_digest(self.idx_path.read_bytes(), f"|{st.st_size}|{st.st_mtime_ns}")
        self._num_classes: int | None = None
        self.keys = keys
        if self._offset_of(0) is not None:
            header, _, size = self._header(0, prefix=_HEADER_PREFIX)
            if header.flag > 0 and len(header.label) >= 2 and size == IRHEADER.size + 4 * header.flag:
                lo, hi = self._header_key_range(header)
                self.keys = np.arange(1, lo, dtype=np.int64)
                self._num_classes = hi - lo
                missing = self.keys[~np.isin(self.keys, self._idx_keys)]
                if len(missing) and not self.skip_bad:
                    raise DataError(f"{self.idx_path}: image record {missing[0]} named by the header is not indexed; "
                                    f"{RECORD_HINT}")  # fmt: skip
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
            raise DataError(f"{self.idx_path}: record {key} is not in the index; {RECORD_HINT}")
        payload, size = self._file.read(key, offset, prefix)
        try:
            header, body = unpack_record(payload)
        except ValueError as exc:
            if prefix is not None and len(payload) < size:  # a header longer than the prefix
                return self._header(key)
            raise damaged(self._where(key), str(exc)) from None
        return header, body, size

    def read_record(self, key: int) -> tuple[IRHeader, bytes]:
        """The IRHeader and body of the record stored under ``key`` (header, image or identity record)."""
        header, body, _ = self._header(int(key))
        return header, body

    def _native_size(self) -> int:
        for key in self.keys[:64].tolist():
            try:
                return int(decode_image(self._header(key)[1], None, self._where(key), RECORD_HINT).shape[1])
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
            raise damaged(self._where(key), f"label {value} is not in {bound_text}")
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
                    decode_image(body, None, self._where(key), RECORD_HINT)
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
        return decode_image(body, self.image_size, self._where(key), RECORD_HINT), label

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
