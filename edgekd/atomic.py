"""Atomic file output: write to a temporary name beside the target, then rename, so no half-written file is seen.

A process killed mid-write (``kill -9``, an out-of-memory kill) cannot clean up after itself, so its temporaries
stay behind under hidden names; the next run on the same folder removes them with ``remove_debris``. Every name
pattern here matches only what this module creates, so a user's own files are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# tempfile's random part of a name: 8 characters of [a-z0-9_].
_RANDOM = r"[a-z0-9_]{8}"
# What atomic_path names its temporary: "." + target name + "." + random part + ".tmp".
TEMP_FILE = re.compile(rf"\..+\.{_RANDOM}\.tmp")
# What discard_tree renames a folder to before deleting it: "." + folder name + "." + random part + ".trash".
TRASH = re.compile(rf"\..+\.{_RANDOM}\.trash")


def _read_umask() -> int:
    # The umask can only be read by setting it; set it back at once. Done once, at import, so that no other
    # thread is likely to create a file in the instant the temporary value is in force.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def file_mode() -> int:
    """The mode ``open()`` would give a new file under the user's umask (e.g. 0o644 under umask 022)."""
    return 0o666 & ~_UMASK


def folder_mode() -> int:
    """The mode ``mkdir`` would give a new folder under the user's umask (e.g. 0o755 under umask 022)."""
    return 0o777 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp creates the file 0600; the output should be readable as any file the user writes.
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new uniquely named folder in ``parent`` with the user's normal folder mode (mkdtemp alone gives 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, folder_mode())
    return path


def discard_tree(path: str | os.PathLike) -> None:
    """Delete a folder so that it is never seen half-deleted: hide it under a trash name first, then remove it.

    If the process dies during the removal, the trash folder is left for ``remove_debris`` (pattern ``TRASH``).
    """
    path = Path(path)
    trash = path.with_name(f".{path.name}.{secrets.token_hex(4)}.trash")
    os.replace(path, trash)
    shutil.rmtree(trash)


def remove_debris(folder: str | os.PathLike, pattern: re.Pattern, min_age_s: float = 0.0) -> list[Path]:
    """Delete the entries of ``folder`` (files or folders) whose whole name matches ``pattern``; return them.

    ``min_age_s`` spares entries modified more recently than that: in a folder several processes share, a
    fresh temporary may still belong to a live writer. A missing folder has no debris.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    now = time.time()
    for entry in folder.iterdir():
        if not pattern.fullmatch(entry.name):
            continue
        try:
            if now - entry.lstat().st_mtime < min_age_s:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:  # another process cleaned it up first
            continue
        removed.append(entry)
    return removed


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
