"""Progress bars for long jobs: tqdm on a terminal, quiet when output is not a TTY (CI, logs)."""

from __future__ import annotations

from collections.abc import Iterable

from tqdm.auto import tqdm


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it", **kw):
    """A tqdm bar that disables itself off a TTY (``disable=None``) so logs stay clean."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None, dynamic_ncols=True, leave=False, **kw)
