"""Format versions of the files edgekd writes and later reads back, and the one check every reader makes.

Every such file carries its format version under ``FORMAT_KEY`` in the JSON object it already holds: a checkpoint's
``state.json``, a model bundle's safetensors metadata entry ``edgekd``, a teacher-embedding cache's info file, a run's
``settings.json``. A writer stamps the version it writes (``stamp``); a reader checks it (``check_format``) before it
uses any other field, because a newer edgekd may have changed what a field means, and guessing would resume a run
wrongly or load wrong weights without a word. A version this edgekd does not read is refused in one line naming the
file and both versions.

Files written before formats were versioned carry no version; they are format 1, the only format there was then, and
are read as such. When a kind's format changes, raise its ``current``; while this edgekd still reads the old layout,
keep ``oldest`` where it is (the reader branches on the version ``check_format`` returns), otherwise raise it too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgekd.errors import CheckpointError, EdgekdError

FORMAT_KEY = "format_version"
# The version of a file written before edgekd stamped formats: the layout each kind had then is its format 1.
UNVERSIONED = 1
UPGRADE = "upgrade edgekd (pip install -U edgekd)"


@dataclass(frozen=True)
class Format:
    """One kind of file: what this edgekd writes and reads, and what a message tells the user to do.

    Args:
        label: the kind as a message names it ("checkpoint format 2 ...").
        current: the version this edgekd writes.
        oldest: the oldest version this edgekd still reads.
        elsewhere: what to do instead of reading a version this edgekd does not read ("... or <elsewhere>").
        damaged: what to do about a file whose version (or JSON) is damaged.
        error: the EdgekdError subclass a refusal raises (what callers of that reader already catch).
    """

    label: str
    current: int
    oldest: int
    elsewhere: str
    damaged: str
    error: type[EdgekdError] = EdgekdError


FORMATS: dict[str, Format] = {
    "checkpoint": Format(
        "checkpoint",
        1,
        1,
        "resume with the edgekd that wrote it",
        "delete that checkpoint folder to resume from the one before it, or start a new run with another --out",
        CheckpointError,
    ),
    "bundle": Format(
        "model bundle",
        1,
        1,
        "load it with the edgekd that wrote it",
        "write the file again with edgekd",
        CheckpointError,
    ),
    "teacher_cache": Format(
        "teacher-embedding cache",
        1,
        1,
        "delete it and this edgekd builds the cache again",
        "delete it and edgekd builds the cache again",
    ),
    "settings": Format(
        "run settings",
        1,
        1,
        "resume with the edgekd that wrote it",
        "start a new run with another --out",
    ),
    "export_sidecar": Format(
        "export sidecar",
        1,
        1,
        "read the artifact with the edgekd that exported it",
        "export the artifact again with edgekd export",
    ),
    "calibration_cache": Format(
        "calibration cache",
        1,
        1,
        "this edgekd calibrates again",
        "this edgekd calibrates again",
    ),
}


def stamp(kind: str, record: dict) -> dict:
    """``record`` with the format version this edgekd writes for ``kind`` (first, where a reader of the file looks)."""
    return {FORMAT_KEY: FORMATS[kind].current, **{k: v for k, v in record.items() if k != FORMAT_KEY}}


def check_format(kind: str, record: object, path: str | os.PathLike) -> int:
    """The format version of ``record``, the JSON object read from ``path``, if this edgekd reads it.

    A record without a version is ``UNVERSIONED``. Raises ``FORMATS[kind].error`` with one line naming ``path`` when
    the record is not a JSON object, its version is not a whole number from 1 (text, null, a list, a fraction, a
    boolean), or the version is newer or older than this edgekd reads.
    """
    fmt = FORMATS[kind]
    if not isinstance(record, dict):
        raise fmt.error(
            f"{path}: not an edgekd {fmt.label} file (it holds {_json_type(record)}, not a JSON object); {fmt.damaged}"
        )
    found = record.get(FORMAT_KEY, UNVERSIONED)
    # bool is an int subclass in Python, but ``true`` is no version number.
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise fmt.error(
            f"{path}: {fmt.label} format version {json.dumps(found)} is not a whole number from 1 (this edgekd reads "
            f"{_readable(fmt)}); the file is damaged or not edgekd's: {fmt.damaged}"
        )
    if found > fmt.current:
        raise fmt.error(
            f"{path}: {fmt.label} format {found} is newer than this edgekd reads ({fmt.current}); "
            f"{UPGRADE} or {fmt.elsewhere}"
        )
    if found < fmt.oldest:
        raise fmt.error(
            f"{path}: {fmt.label} format {found} is older than this edgekd reads ({_readable(fmt)}); {fmt.elsewhere}"
        )
    return found


def parse_versioned_json(kind: str, text: str, path: str | os.PathLike) -> dict:
    """The JSON object ``text`` (the content of ``path``), checked by ``check_format``; one line if it is no JSON."""
    try:
        record = json.loads(text)
    except ValueError as exc:  # a truncated or overwritten file
        fmt = FORMATS[kind]
        raise fmt.error(f"{path}: not valid JSON ({str(exc).splitlines()[0]}); {fmt.damaged}") from None
    check_format(kind, record, path)
    return record


def read_versioned_json(kind: str, path: str | os.PathLike) -> dict:
    """The JSON object in the file ``path``, checked by ``check_format``; one line if it cannot be read."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise FORMATS[kind].error(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    return parse_versioned_json(kind, text, path)


def _readable(fmt: Format) -> str:
    return str(fmt.current) if fmt.oldest == fmt.current else f"{fmt.oldest} to {fmt.current}"


def _json_type(value: object) -> str:
    names = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
