"""Where a command will write, checked before it does any work, so a bad output path fails in one line and leaves
nothing behind: a file where a folder is needed (or the reverse), a parent that is a file, a symbolic-link loop,
a place that cannot be written (probed, the only test that holds for root on a read-only mount), and a name that
is not UTF-8 text (it could be created, but not recorded in settings.json or a sidecar, so a run there could never
be resumed). Used by every command that writes: ``teacher``, ``distill``, ``study``, ``data``, ``export``.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from edgekd.errors import EdgekdError

__all__ = ["check_output_file", "check_output_dir"]


def _shown(path: Path) -> str:
    """``path`` as printable text, bytes that are not UTF-8 written as escapes."""
    return os.fsdecode(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _check_name(path: Path, option: str) -> None:
    try:
        os.fsdecode(path).encode("utf-8")
    except UnicodeEncodeError:
        raise EdgekdError(
            f"{option} {_shown(path)} is not UTF-8 text; edgekd records its paths in JSON, so choose a UTF-8 name"
        ) from None
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise EdgekdError(f"{option} {_shown(path)} is a symbolic-link loop; point it at a real folder") from None


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder that ``mkdir -p`` would start from)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_can_create_in(folder: Path, shown: str) -> None:
    """Create and remove a probe file in ``folder`` (or the ancestor ``mkdir -p`` would start from)."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise EdgekdError(
            f"cannot write {shown}: {_shown(existing)} is a file, not a folder; choose a path under a folder"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".edgekd-write-check-", dir=existing)
    except OSError as exc:
        raise EdgekdError(f"cannot write {shown}: folder {_shown(existing)} is not writable ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | os.PathLike, suffix: str | None = None, option: str = "--out") -> Path:
    """Check that the file ``path`` can be written (it may exist: it is replaced atomically): not a folder, the
    expected ``suffix`` (None: any), a writable folder. Returns ``path`` as a Path; a one-line EdgekdError if not."""
    path = Path(path)
    _check_name(path, option)
    if path.is_dir():
        raise EdgekdError(
            f"{option} {_shown(path)} is an existing folder; give a file path{f' ending in {suffix}' if suffix else ''}"
        )
    if suffix and path.suffix != suffix:
        raise EdgekdError(f"{option} {_shown(path)} must end in {suffix}")
    if path.exists() and not os.access(path, os.W_OK):
        raise EdgekdError(f"{option} {_shown(path)} exists and is not writable")
    _check_can_create_in(path.parent, f"{option} {_shown(path)}")
    return path


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Check that files can be written into the folder ``path`` (made later if missing). Returns it as a Path; a
    one-line EdgekdError if it is a file, a loop, not UTF-8, or neither it nor its nearest ancestor is writable."""
    path = Path(path)
    _check_name(path, option)
    if path.exists() and not path.is_dir():
        raise EdgekdError(f"{option} {_shown(path)} is a file, not a folder; choose a folder (it is made if missing)")
    if path.is_symlink() and not path.exists():
        raise EdgekdError(
            f"{option} {_shown(path)} is a symbolic link to {_shown(Path(os.readlink(path)))}, which does not exist; "
            "make that folder or choose another"
        )
    _check_can_create_in(path, f"into {option} {_shown(path)}")
    return path
