"""edgekd's on-disk cache: where it lives (entries are keyed with ``edgekd.utils.hashing``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$EDGEKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/edgekd``, else ``~/.cache/edgekd``."""
    if os.environ.get("EDGEKD_CACHE_DIR"):
        return Path(os.environ["EDGEKD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgekd"
