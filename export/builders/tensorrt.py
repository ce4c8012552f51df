"""ONNX -> TensorRT engine for TensorRT 10 and 11, with a check of the precision every layer actually got.

TensorRT 10 is weakly typed: the builder picks each layer's precision among those its flags allow, so FP16 means the
FP32 graph plus ``BuilderFlag.FP16`` and INT8 means the Q/DQ graph plus ``BuilderFlag.INT8``. TensorRT 11 removed those
flags and is always strongly typed: the precision is the graph's, so FP16 means the FP16-typed ONNX and INT8 the Q/DQ
ONNX (reference/export.md §0, §2). A flag that is missing where it is needed is a loud error, never a silent FP32
build; and whatever the version, the built engine's layers are read back through the engine inspector and the build
fails when the requested precision is not what the convolutions run in.

``tensorrt`` is imported through ``edgekd.export.optional_deps``; without it a one-line ``MissingDependency`` says what
to install.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgekd.atomic import atomic_path
from edgekd.errors import EdgekdError, GateFailed, MissingDependency
from edgekd.export.optional_deps import TRT_INSTALL_HINT, import_tensorrt, trt_major
from edgekd.export.passes.precisions import PRECISION_TABLE

__all__ = [
    "EngineProfile",
    "BuildResult",
    "build_engine",
    "layer_precisions",
    "census_from_layer_info",
    "check_layer_precisions",
]

_COMPUTE_HINTS = ("conv", "gemm", "matrixmultiply", "fullyconnected")


@dataclass
class EngineProfile:
    """The optimization profile of the dynamic batch axis: ``min <= opt <= max``."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise EdgekdError(
                f"TensorRT profile needs 1 <= min <= opt <= max batch, got "
                f"{self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )


@dataclass
class BuildResult:
    """A built engine and what was learned while building it."""

    plan: bytes
    trt_version: str
    typing: str  # "weak (builder flags)" or "strong (graph precision)"
    flags: list[str]
    layers: dict[str, Any] = field(default_factory=dict)  # precision census from the engine inspector

    def meta(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("plan")
        return d


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def build_engine(
    onnx_path: str | os.PathLike,
    precision: str,
    input_shape: tuple[int, int, int],
    profile: EngineProfile,
    *,
    workspace_bytes: int = 1 << 30,
    timing_cache: str | os.PathLike | None = None,
    optimization_level: int = 3,
    min_fraction: float = 0.5,
    expected_int8_layers: int | None = None,
) -> BuildResult:
    """Build and inspect an engine.

    Args:
        onnx_path: the ONNX to parse. TensorRT 10: the FP32 graph for ``fp32``/``fp16``, the Q/DQ graph for ``int8``.
            TensorRT 11: the graph whose types are the precision (FP32, FP16-typed, Q/DQ).
        precision: ``fp32``, ``fp16`` or ``int8``.
        input_shape: ``(C, H, W)`` of the input.
        profile: batch range of the optimization profile.
        workspace_bytes: builder workspace limit.
        timing_cache: file to load tactic timings from and save them to (created when missing).
        optimization_level: ``builder_optimization_level`` (0-5).
        min_fraction: least share of convolution/GEMM layers that must run in the requested precision.
        expected_int8_layers: for ``int8``, how many weighted layers the Q/DQ graph quantizes.

    Returns:
        The serialized plan, versions, flags and the layer-precision census.

    Raises:
        MissingDependency: no TensorRT or no GPU.
        EdgekdError: the parser or the builder failed, or a needed builder flag does not exist.
        GateFailed: the engine's layers are not in the requested precision.
    """
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise MissingDependency(f"building a TensorRT engine needs an NVIDIA GPU; none is visible. {TRT_INSTALL_HINT}")
    major = trt_major(trt)
    if major < 10:
        raise MissingDependency(f"TensorRT {trt.__version__} is too old; edgekd supports TensorRT 10 and 11")
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode since 10; 11 is always strongly typed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0].splitlines()[0] if errors else "unknown parser error"
        raise EdgekdError(f"TensorRT's ONNX parser rejected {onnx_path}: {first}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    config.builder_optimization_level = int(optimization_level)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    flags = _set_precision_flags(trt, major, config, precision)

    input_name = network.get_input(0).name
    opt_profile = builder.create_optimization_profile()
    shape = tuple(input_shape)
    opt_profile.set_shape(
        input_name, (profile.min_batch, *shape), (profile.opt_batch, *shape), (profile.max_batch, *shape)
    )
    config.add_optimization_profile(opt_profile)

    cache_path = Path(timing_cache) if timing_cache else None
    blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache from another GPU is rejected

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgekdError("TensorRT failed to build the engine (see the TensorRT log lines above)")
    plan = bytes(serialized)
    if cache_path is not None:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))

    census = layer_precisions(plan)
    check_layer_precisions(census, precision, min_fraction=min_fraction, expected_int8_layers=expected_int8_layers)
    typing = "weak (builder flags)" if major == 10 else "strong (graph precision)"
    return BuildResult(plan=plan, trt_version=str(trt.__version__), typing=typing, flags=flags, layers=census)


def _set_precision_flags(trt, major: int, config, precision: str) -> list[str]:
    """TensorRT 10: set the flags ``precision`` needs (its ``trt10_flags``), failing loudly if they do not exist.
    TensorRT 11: none."""
    if precision not in PRECISION_TABLE:
        raise EdgekdError(f"unknown TensorRT precision {precision!r}")
    if major >= 11:
        return []
    flags = []
    for name in PRECISION_TABLE[precision].trt10_flags:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise EdgekdError(
                f"TensorRT {trt.__version__} has no BuilderFlag.{name}; this TensorRT 10 build cannot "
                f"make a {precision} engine from builder flags (feed a typed graph on TensorRT 11)"
            )
        config.set_flag(flag)
        flags.append(name)
    return flags


def _datatype(fmt: str) -> str:
    f = fmt.lower()
    if "int8" in f:
        return "int8"
    if "half" in f or "fp16" in f:
        return "fp16"
    if "bf16" in f or "bfloat" in f:
        return "bf16"
    if "float" in f or "fp32" in f:
        return "fp32"
    if "int32" in f or "int64" in f or "bool" in f:
        return "int"
    return "other"


def layer_precisions(plan: bytes) -> dict[str, Any]:
    """Count the precision each engine layer runs in, from the engine inspector (needs a DETAILED build).

    A layer's precision is that of its first floating or INT8 input (``Format/Datatype``); convolution/GEMM layers
    are counted apart because they are where precision matters.

    Returns:
        ``{"layers": {precision: n}, "compute_layers": {precision: n}, "compute_total": n, "detailed": bool}``.
    """
    trt = import_tensorrt()
    runtime = trt.Runtime(_logger(trt))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EdgekdError("TensorRT could not deserialize the engine it just built")
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return census_from_layer_info(info)


def census_from_layer_info(info: dict[str, Any]) -> dict[str, Any]:
    """The precision census of an engine-inspector JSON document (``{"Layers": [...]}``)."""
    layers = info.get("Layers", [])
    all_counts: Counter[str] = Counter()
    compute: Counter[str] = Counter()
    detailed = bool(layers) and all(isinstance(layer, dict) for layer in layers)
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        kind = str(layer.get("LayerType", "")).lower()
        if kind in ("reformat", "shuffle", "constant", "nocopy"):
            continue
        types = [_datatype(str(t.get("Format/Datatype", ""))) for t in layer.get("Inputs", [])]
        types = [t for t in types if t in ("int8", "fp16", "bf16", "fp32")]
        weights_int8 = str(layer.get("Weights", {}).get("Type", "")).lower() == "int8"
        prec = "int8" if "int8" in types or weights_int8 else (types[0] if types else "other")
        all_counts[prec] += 1
        name = str(layer.get("Name", "")).lower()
        if "quantize" in kind:
            continue
        if any(h in kind for h in _COMPUTE_HINTS) or any(h in name for h in ("conv", "gemm")):
            compute[prec] += 1
    return {
        "layers": dict(all_counts),
        "compute_layers": dict(compute),
        "compute_total": sum(compute.values()),
        "detailed": detailed,
    }


def check_layer_precisions(
    census: dict[str, Any], precision: str, *, min_fraction: float = 0.5, expected_int8_layers: int | None = None
) -> None:
    """Raise ``GateFailed`` unless the engine runs its convolutions in ``precision``.

    ``fp32``: no FP16/INT8 compute layer. ``fp16``: at least ``min_fraction`` of compute layers in FP16 (TensorRT 10
    may keep a faster FP32 kernel for some). ``int8``: at least ``min_fraction`` of ``expected_int8_layers`` (or of all
    compute layers) in INT8.
    """
    if not census.get("detailed"):
        raise GateFailed("the engine inspector returned no per-layer types; cannot verify the engine's precision")
    compute = census.get("compute_layers", {})
    total = max(1, int(census.get("compute_total", 0)))
    if precision == "fp32":
        low = compute.get("fp16", 0) + compute.get("int8", 0) + compute.get("bf16", 0)
        if low:
            raise GateFailed(f"asked for an FP32 engine but {low} of {total} compute layers run in reduced precision")
        return
    key = precision
    got = compute.get(key, 0)
    need_of = expected_int8_layers if precision == "int8" and expected_int8_layers else total
    if got < min_fraction * need_of or got == 0:
        raise GateFailed(
            f"asked for a {precision.upper()} engine but only {got} of {need_of} compute layers run in "
            f"{precision.upper()} (census {compute}); TensorRT built something else"
        )
