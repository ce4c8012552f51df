"""The calibration cache: activation ranges on disk, keyed by everything that determines them.

Key = SHA-256 of (ONNX model content hash, calibration data fingerprint, method, method settings, cache format). A
change to any of them is a miss; an identical request is a hit and skips calibration. Each entry is two files in the
cache folder: ``<key>.json`` (ONNX Runtime's ``TensorsData`` JSON, which ``quantize_static`` reads through
``calibration_cache_path``) and ``<key>.meta.json`` (the key's parts, for people). Both are written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgekd.atomic import write_json
from edgekd.errors import EdgekdError
from edgekd.formats import read_versioned_json, stamp
from edgekd.utils.cache import cache_root
from edgekd.utils.hashing import content_digest, json_digest

__all__ = ["CACHE_FORMAT", "default_cache_dir", "cache_key", "model_sha256", "CalibrationCache"]

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``calib/`` under edgekd's cache root (see ``edgekd.utils.cache.cache_root``)."""
    return cache_root() / "calib"


def model_sha256(model, length: int = 32) -> str:
    """Content hash of an ``onnx.ModelProto`` (its deterministic serialization)."""
    return content_digest(model.SerializeToString(deterministic=True), length=length)


def cache_key(model_hash: str, data_fingerprint: str, method: str, settings: dict[str, Any]) -> str:
    """A 24-hex-digit key for one calibration request."""
    parts = {
        "format": CACHE_FORMAT,
        "model": model_hash,
        "data": data_fingerprint,
        "method": method,
        "settings": settings,
    }
    return json_digest(parts, length=24)


class CalibrationCache:
    """A folder of cached ranges.

    Args:
        root: the cache folder (created on first store); None means ``default_cache_dir()``.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        """Where the ranges of ``key`` live (whether or not they exist yet)."""
        return self.root / f"{key}.json"

    def lookup(self, key: str) -> Path | None:
        """The ranges file of ``key`` if it is cached and readable, else None. A corrupt entry, or one whose
        ``.meta.json`` carries a format this edgekd does not read (newer, garbled, or none: an entry whose meta file
        is gone), is dropped: it is a cache, so it is calibrated again."""
        path, meta = self.path(key), self.root / f"{key}.meta.json"
        if not path.is_file():
            return None
        try:
            json.loads(path.read_text())
            read_versioned_json("calibration_cache", meta)
        except (OSError, ValueError, EdgekdError):
            path.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            return None
        return path

    def store(self, key: str, tensors_data, info: dict[str, Any]) -> Path:
        """Write ``tensors_data`` (ORT ``TensorsData``) and ``info`` under ``key``; returns the ranges path."""
        from onnxruntime.quantization.calibrate import save_tensors_data

        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EdgekdError(f"cannot create the calibration cache folder {self.root}: {exc.strerror}") from None
        path = self.path(key)
        save_tensors_data(tensors_data, path)  # temporary file + os.replace inside ORT
        write_json(self.root / f"{key}.meta.json", stamp("calibration_cache", {"key": key, **info}))
        return path

    def info(self, key: str) -> dict[str, Any] | None:
        """The human-readable parts stored beside ``key``."""
        meta = self.root / f"{key}.meta.json"
        return json.loads(meta.read_text()) if meta.is_file() else None
