"""Calibration data and INT8 range estimation (installed as ``edgekd.calib``).

``calibrate(model, calib_set, method)`` returns the activation ranges for an FP32 ONNX model, computing them with
ONNX Runtime's calibrators or reusing a cached result when the model, the data, the method and its settings are all
unchanged. ``edgekd.export.passes.int8`` turns the ranges into an explicit Q/DQ graph.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from edgekd.calib.cache import CalibrationCache, cache_key, model_sha256
from edgekd.calib.dataset import CalibrationSet, build_calibration_set
from edgekd.calib.observers import CALIBRATION_METHODS, compute_ranges, resolve_settings

__all__ = [
    "CalibrationResult",
    "CalibrationSet",
    "CalibrationCache",
    "CALIBRATION_METHODS",
    "build_calibration_set",
    "calibrate",
]


@dataclass
class CalibrationResult:
    """Where the ranges are and how they were obtained.

    Attributes:
        path: ORT ``TensorsData`` JSON (pass as ``calibration_cache_path`` to ``quantize_static``).
        key: the cache key.
        hit: True when the ranges came from the cache.
        method: calibration method.
        settings: the method's settings.
        seconds: time spent (calibration or lookup).
    """

    path: Path
    key: str
    hit: bool
    method: str
    settings: dict[str, Any]
    seconds: float


def calibrate(
    model: onnx.ModelProto,
    calib_set: CalibrationSet,
    method: str = "entropy",
    *,
    settings: dict[str, Any] | None = None,
    op_types: list[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
) -> CalibrationResult:
    """Activation ranges of ``model`` on ``calib_set``, from the cache when possible.

    Args:
        model: the FP32 ONNX model to be quantized.
        calib_set: normalized calibration images.
        method: ``minmax``, ``entropy`` or ``percentile``.
        settings: overrides of the method's defaults (``percentile``, ``num_bins``, ...).
        op_types: node types to calibrate around (part of the key).
        cache_dir: the cache folder; None means the default (``~/.cache/edgekd/calib``).
        batch_size: images per calibration run.
    """
    resolved = resolve_settings(method, settings)
    key_settings = {**resolved, "op_types": sorted(op_types) if op_types else None}
    model_hash = model_sha256(model)
    key = cache_key(model_hash, calib_set.fingerprint, method, key_settings)
    cache = CalibrationCache(cache_dir)
    start = time.perf_counter()
    hit = cache.lookup(key)
    if hit is not None:
        return CalibrationResult(hit, key, True, method, resolved, time.perf_counter() - start)
    input_name = model.graph.input[0].name
    ranges = compute_ranges(model, calib_set.reader(input_name, batch_size), method, resolved, op_types)
    info = {
        "model_sha256": model_hash,
        "data_fingerprint": calib_set.fingerprint,
        "data_source": calib_set.source,
        "num_images": len(calib_set),
        "method": method,
        "settings": key_settings,
    }
    path = cache.store(key, ranges, info)
    return CalibrationResult(path, key, False, method, resolved, time.perf_counter() - start)
