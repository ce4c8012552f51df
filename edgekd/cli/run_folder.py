"""A run folder that a failed start leaves as it found it.

``edgekd teacher`` and ``edgekd distill`` write ``settings.json`` into ``--out`` before training, and a run folder
holding settings is a run: a fresh command there is refused ("holds a run already") and ``--resume`` continues it.
So a command that fails before it has made anything worth resuming (a typo found late, a teacher that cannot serve
the data, a loss that diverges at step 4) must not leave settings behind: ``undo_if_nothing_made`` removes every
file and folder the command created, unless the command produced a checkpoint or a final model file by then. What
was in the folder before the command is never touched.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from edgekd.train.checkpoint import CHECKPOINT_NAME

__all__ = ["undo_if_nothing_made"]


def _entries(root: Path) -> set[Path]:
    """Every path under ``root`` (``root`` itself included when it exists); symlinks are not followed."""
    if not root.exists() and not root.is_symlink():
        return set()
    found = {root}
    if root.is_dir() and not root.is_symlink():
        found.update(root.rglob("*"))
    return found


def _worth_keeping(path: Path) -> bool:
    """A checkpoint folder or a finished model: what ``--resume`` or a later stage reads."""
    return CHECKPOINT_NAME.fullmatch(path.name) is not None or path.suffix == ".safetensors"


@contextlib.contextmanager
def undo_if_nothing_made(out: Path, enabled: bool = True) -> Iterator[None]:
    """Run the block; if it raises (any exception, Ctrl-C included) before it created a checkpoint or a model file
    under ``out``, remove what it created there, deepest first, then re-raise. ``enabled``: False on ranks other
    than 0 (rank 0 owns the folder)."""
    out = Path(out)
    before = _entries(out) if enabled else set()
    try:
        yield
    except BaseException:
        if enabled:
            created = _entries(out) - before
            if not any(_worth_keeping(p) for p in created):
                for path in sorted(created, key=lambda p: len(p.parts), reverse=True):
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
        raise
