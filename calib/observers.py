"""Range estimators: MinMax, Entropy and Percentile, run by ONNX Runtime's calibrators.

ORT's calibrators add every tensor that feeds or leaves a quantizable node to the graph outputs, run the calibration
set through it, and reduce the values to one range per tensor: the extreme values (MinMax), the range minimizing the
KL divergence between the float histogram and its quantized version (Entropy, TensorRT's classic method), or a
percentile of the absolute values (Percentile). Ranges are symmetric around 0, as TensorRT's INT8 needs.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

import onnx

from edgekd.errors import EdgekdError

__all__ = ["CALIBRATION_METHODS", "DEFAULT_SETTINGS", "resolve_settings", "compute_ranges"]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")

DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "minmax": {"symmetric": True, "moving_average": False},
    "entropy": {"symmetric": True, "num_bins": 512, "num_quantized_bins": 128},
    "percentile": {"symmetric": True, "num_bins": 2048, "percentile": 99.999},
}


def resolve_settings(method: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method's default settings updated with ``overrides`` (unknown keys are an error)."""
    if method not in CALIBRATION_METHODS:
        raise EdgekdError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    settings = dict(DEFAULT_SETTINGS[method])
    for key, value in (overrides or {}).items():
        if key not in settings:
            raise EdgekdError(f"calibration method {method} has no setting {key!r} (it has {', '.join(settings)})")
        settings[key] = value
    return settings


def compute_ranges(
    model: onnx.ModelProto,
    reader,
    method: str,
    settings: dict[str, Any],
    op_types: list[str] | None = None,
):
    """Run the calibration set through ``model`` and return ORT ``TensorsData`` (one range per tensor).

    Args:
        model: the FP32 ONNX model that will be quantized (tensor names must match it).
        reader: an ORT ``CalibrationDataReader`` (e.g. ``CalibrationSet.reader``).
        method: ``minmax``, ``entropy`` or ``percentile``.
        settings: from ``resolve_settings``.
        op_types: node types whose inputs and outputs are calibrated (None: all).
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    ort_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    inferred = onnx.shape_inference.infer_shapes(model)
    with tempfile.TemporaryDirectory(prefix="edgekd-calib-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(inferred, str(path))
        calibrator = create_calibrator(
            path,
            op_types,
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=ort_method,
            providers=["CPUExecutionProvider"],
            extra_options=dict(settings),
        )
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # ORT prints progress lines
                calibrator.collect_data(reader)
                ranges = calibrator.compute_data()
        finally:
            del calibrator
    return ranges
