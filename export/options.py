"""What ``edgekd export`` can be told: ``ExportOptions``, with the INT8 pass's settings (``Int8Options``) and the
engine's optimization profile (``EngineProfile``) nested as the passes and builders take them, and the names of the
targets, precisions (``PRECISION_TABLE``'s) and engine routes that the CLI offers."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from edgekd.errors import EdgekdError
from edgekd.export.builders.executorch import EXECUTORCH_PRECISIONS
from edgekd.export.builders.tensorrt import EngineProfile
from edgekd.export.checks.gates import DEFAULT_GATE_BATCHES, DEFAULT_MAX_DROP
from edgekd.export.passes.int8 import Int8Options
from edgekd.export.passes.precisions import PRECISION_TABLE

__all__ = ["TARGETS", "TARGET_SUFFIXES", "PRECISIONS", "ENGINE_ROUTES", "ExportOptions", "check_options"]

# --target: what the export writes. onnx: a dynamic-batch ONNX file (ONNX Runtime, TensorRT); executorch: a batch-1
# .pte program for ExecuTorch's XNNPACK backend (Android, iOS, embedded Linux).
TARGET_SUFFIXES = {"onnx": ".onnx", "executorch": ".pte"}
TARGETS = tuple(TARGET_SUFFIXES)
PRECISIONS = tuple(PRECISION_TABLE)  # --precision's choices, in the table's order
ENGINE_ROUTES = ("onnx", "torch-tensorrt")  # --trt-via: TensorRT's ONNX parser, or torch-tensorrt on the model
# ExportOptions fields that only the ONNX target reads -> the options that set them; an ExecuTorch export refuses
# them when they differ from their defaults, instead of ignoring what the user asked for
ONNX_ONLY_OPTIONS = {
    "opset": "--opset",
    "legacy_exporter": "--legacy-exporter",
    "ort_cpu_rewrites": "--ort-cpu-rewrites",
    "calib_method": "--calib-method",  # the XNNPACK quantizer has its own observers
    "calib_cache": "--calib-cache",
    "int8": "--keep-first/--keep-last/--int8-activations",
    "trt": "--trt",
}


@dataclass
class ExportOptions:
    """Everything ``edgekd export`` can be told; the CLI maps its options onto these fields (``--keep-first``,
    ``--keep-last`` and ``--int8-activations`` onto ``int8``, ``--trt-batch`` onto ``profile``)."""

    target: str = "onnx"  # a TARGETS name
    precision: str = "fp32"
    opset: int = 20
    legacy_exporter: bool = False
    static_batch: int | None = None  # fix the batch axis (NNAPI/CoreML/other fixed-shape runtimes); None: dynamic
    ort_cpu_rewrites: bool = False  # bake edgekd.export.passes.ort_cpu's rewrites into the artifact
    # gates
    gate_batches: tuple[int, ...] = DEFAULT_GATE_BATCHES
    gate_images: int = 64
    real_images: str | None = None
    gate_data: str = "synthetic"  # generated gate images: a synthetic spec (held-out identities are drawn)
    min_cosine: float | None = None
    pairs: str | None = None  # task-gate pairs; None: the precision's default_pairs (INT8: held-out synthetic ones)
    max_drop: float = DEFAULT_MAX_DROP
    seed: int = 0
    # int8: the calibration source, then the Q/DQ placement
    calib: str | None = None
    calib_images: int = 128
    calib_method: str = "percentile"
    calib_cache: str | None = None
    skip_bad: bool = False  # leave unreadable calibration (and --images) images out instead of stopping
    int8: Int8Options = field(default_factory=Int8Options)
    # tensorrt
    trt: bool = False
    trt_via: str = "onnx"
    profile: EngineProfile = field(default_factory=EngineProfile)
    workspace_gib: float = 1.0
    timing_cache: str | None = None
    optimization_level: int = 3


def check_options(options: ExportOptions) -> None:
    """One-line errors for option values no export can use (the CLI's click types catch most of them earlier)."""
    if options.target not in TARGETS:
        raise EdgekdError(f"unknown target {options.target!r}; choose one of {', '.join(TARGETS)}")
    if options.precision not in PRECISIONS:
        raise EdgekdError(f"unknown precision {options.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if options.target == "executorch":
        _check_executorch_options(options)
    if PRECISION_TABLE[options.precision].needs_calibration and not options.calib:
        raise EdgekdError(
            f"--precision {options.precision} needs --calib SOURCE (an image folder, a dataset spec, or builtin)"
        )
    for option, value in (("--gate-images", options.gate_images), ("--calib-images", options.calib_images)):
        if value < 1:
            raise EdgekdError(f"{option} must be at least 1, got {value}")
    if options.static_batch is not None and options.static_batch < 1:
        raise EdgekdError(f"--static-batch must be at least 1, got {options.static_batch}")
    if not options.gate_batches or min(options.gate_batches) < 1:
        raise EdgekdError(f"--gate-batches must be positive integers, got {options.gate_batches}")
    if options.min_cosine is not None and not -1.0 <= options.min_cosine <= 1.0:
        raise EdgekdError(f"--min-cosine must lie in [-1, 1], got {options.min_cosine}")
    if not 0.0 <= options.max_drop <= 100.0:
        raise EdgekdError(f"--max-drop must lie in [0, 100] points, got {options.max_drop}")


def _check_executorch_options(options: ExportOptions) -> None:
    """``--target executorch`` takes the precisions XNNPACK runs, a batch of 1, and none of the ONNX-only options."""
    if options.precision not in EXECUTORCH_PRECISIONS:
        raise EdgekdError(
            f"--target executorch writes {' or '.join(EXECUTORCH_PRECISIONS)} programs, not {options.precision}"
        )
    if options.static_batch not in (None, 1):
        raise EdgekdError(f"--target executorch programs take batch 1; drop --static-batch {options.static_batch}")
    defaults = ExportOptions()
    for f in fields(ExportOptions):
        if f.name in ONNX_ONLY_OPTIONS and getattr(options, f.name) != getattr(defaults, f.name):
            raise EdgekdError(f"{ONNX_ONLY_OPTIONS[f.name]} applies to --target onnx only; drop it for executorch")
