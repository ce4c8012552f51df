"""Up-front checks of the files and folders a deployment command will write, so a bad ``--out`` fails in one line
before minutes of export and gates, and leaves nothing behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from edgekd.errors import EdgekdError

__all__ = ["check_output_file", "check_output_dir"]


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder that ``mkdir -p`` would start from)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_can_create_in(folder: Path, shown: str) -> None:
    """Create and remove a probe file in ``folder``: the only test that also holds for root on a read-only mount."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise EdgekdError(f"cannot write {shown}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".edgekd-write-check-", dir=existing)
    except OSError as exc:
        raise EdgekdError(f"cannot write {shown}: folder {existing} is not writable ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | os.PathLike, suffix: str | None = None, option: str = "--out") -> Path:
    """Check that the file ``path`` can be written: not a folder, the expected ``suffix``, a writable folder.

    Args:
        path: the file to be written (it may exist; it will be replaced).
        suffix: required suffix, e.g. ``.onnx`` (None: any).
        option: the option's name, for the message.

    Returns:
        ``path`` as a Path.

    Raises:
        EdgekdError: one line naming the problem.
    """
    path = Path(path)
    if path.is_dir():
        raise EdgekdError(
            f"{option} {path} is an existing folder; give a file path{f' ending in {suffix}' if suffix else ''}"
        )
    if suffix and path.suffix != suffix:
        raise EdgekdError(f"{option} {path} must end in {suffix}")
    if path.exists() and not os.access(path, os.W_OK):
        raise EdgekdError(f"{option} {path} exists and is not writable")
    _check_can_create_in(path.parent, f"{option} {path}")
    return path


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Check that files can be written into the folder ``path`` (created later if missing).

    Raises:
        EdgekdError: ``path`` is a file, or neither it nor its nearest existing ancestor is writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EdgekdError(f"{option} {path} is a file; give a folder")
    _check_can_create_in(path, f"into {option} {path}")
    return path
