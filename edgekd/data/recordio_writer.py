"""Writing RecordIO: ``RecordWriter`` appends framed records to a ``.rec`` and their offsets to its ``.idx``, both put
in place only when writing succeeds, and ``pack_image_folder`` packs an image folder in the insightface layout
(``edgekd.data.recordio_format`` has both layouts).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from edgekd.atomic import atomic_path
from edgekd.data.image_bytes import encode_image_file
from edgekd.data.image_folder import ImageFolder
from edgekd.data.recordio_format import CHUNK, MAGIC, encode_chunks, pack_record
from edgekd.errors import DataError

__all__ = ["RecordWriter", "pack_image_folder"]


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
        magic, lrec = CHUNK.unpack(self._rec.read(CHUNK.size))
        if magic != MAGIC or lrec != len(payload) or len(data) != CHUNK.size + len(payload) + (-len(payload) % 4):
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
    hint = "" if skip_bad else "replace or remove it, or pack with --skip-bad to leave such images out"
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
