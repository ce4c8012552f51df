"""The bytes of insightface / MXNet RecordIO, as dmlc writes them: chunk framing and the ``IRHeader`` of a record.

Layout (reference/face.md §4.1): ``train.idx`` holds ``key<TAB>offset`` lines; ``train.rec`` is a stream of chunks
``uint32 magic 0xCED7230A, uint32 lrec, payload, zero padding to 4 bytes`` where ``lrec`` packs a 29-bit length and a
3-bit continuation flag. A payload that contains the magic word at a 4-aligned offset is stored split at those words
(flag 1 first, 2 middle, 3 last) and the reader re-inserts the magic between the parts. Each record payload starts
with the 24-byte ``IRHeader`` ``<IfQQ`` (flag, label, id, id2); ``flag > 0`` means ``flag`` float32 labels follow.
In the insightface layout record 0 is a header with label ``[N+1, N+1+K]``, images are keys ``1..N`` and identity
records ``N+1..N+K`` hold each class's ``[start, end)`` key range.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from edgekd.errors import DataError

__all__ = [
    "MAGIC",
    "MAGIC_BYTES",
    "MAX_RECORD",
    "CHUNK",
    "IRHEADER",
    "IRHeader",
    "pack_record",
    "unpack_record",
    "encode_chunks",
]

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
MAX_RECORD = 1 << 29
CHUNK = struct.Struct("<II")  # a chunk's header: magic, lrec
IRHEADER = struct.Struct("<IfQQ")


class IRHeader(NamedTuple):
    """The header at the start of every record payload; ``label`` is a float or a tuple of floats."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


def pack_record(label: float | Sequence[float], body: bytes = b"", id: int = 0, id2: int = 0) -> bytes:
    """An IRHeader (flag = number of labels for an array, 0 for a scalar) followed by ``body``."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        return IRHEADER.pack(0, float(label), id, id2) + body
    labels = np.asarray(label, dtype="<f4").ravel()
    return IRHEADER.pack(len(labels), 0.0, id, id2) + labels.tobytes() + body


def unpack_record(payload: bytes) -> tuple[IRHeader, bytes]:
    """Split a record payload into its IRHeader and body; raises ``ValueError`` when it is too short."""
    if len(payload) < IRHEADER.size:
        raise ValueError(f"record payload has {len(payload)} bytes, shorter than the 24-byte IRHeader")
    flag, label, id_, id2 = IRHEADER.unpack_from(payload)
    start = IRHEADER.size
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
        out += [CHUNK.pack(MAGIC, ((1 if start == 0 else 2) << 29) | (pos - start)), view[start:pos]]
        start = pos + 4
    out += [CHUNK.pack(MAGIC, ((3 if start else 0) << 29) | (len(payload) - start)), view[start:]]
    out.append(b"\0" * (-len(payload) % 4))
    return b"".join(out)
