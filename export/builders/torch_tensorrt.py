"""Compile the PyTorch model with torch-tensorrt (dynamo path) instead of parsing ONNX: ``--trt-via torch-tensorrt``.

FP32 compiles the model as is; another precision compiles ``x.to(dtype) -> model.to(dtype) -> out.float()`` with its
``torch_dtype`` (``edgekd.export.passes.precisions``; FP16 for fp16), so the precision is in the graph itself
(torch-tensorrt >= 2.13 ignores ``enabled_precisions`` on the dynamo path, reference/export.md §3.2) and the interface
stays float32. ``require_full_compilation`` keeps every op inside TensorRT. INT8 needs ModelOpt fake-quant modules and
is not offered on this route (no ``torch_dtype``); use the ONNX route (``--trt`` with ``--precision int8``).

The compiled program is saved with ``torch_tensorrt.save`` (ExportedProgram format); ``edgekd.export.engine`` gates it
exactly like an engine built from ONNX, and ``edgekd.export.runtimes.torch_tensorrt`` runs it. ``torch_tensorrt`` is
imported through ``edgekd.export.optional_deps``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from edgekd.errors import EdgekdError, MissingDependency
from edgekd.export.builders.tensorrt import EngineProfile, census_from_layer_info
from edgekd.export.optional_deps import TORCH_TRT_INSTALL_HINT, import_torch_tensorrt
from edgekd.export.passes.precisions import PRECISION_TABLE

__all__ = ["compile_torch_tensorrt", "save_torch_tensorrt"]


class _Typed(torch.nn.Module):
    """float32 in, float32 out, ``dtype`` inside."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model.to(dtype)
        self.inner_dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.inner_dtype)).float()


def compile_torch_tensorrt(
    model: torch.nn.Module,
    input_shape: tuple[int, int, int],
    precision: str,
    profile: EngineProfile,
    *,
    workspace_bytes: int = 1 << 30,
    optimization_level: int = 3,
    timing_cache: str | os.PathLike | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Compile ``model`` for the batches in ``profile``.

    Returns:
        The compiled module (CUDA, float32 in/out) and a metadata dict (versions, settings, layer census if the
        engines expose detailed layer information).
    """
    torch_trt = import_torch_tensorrt()
    if not torch.cuda.is_available():
        raise MissingDependency(f"torch-tensorrt needs an NVIDIA GPU; none is visible. {TORCH_TRT_INSTALL_HINT}")
    dtype = PRECISION_TABLE[precision].torch_dtype if precision in PRECISION_TABLE else None
    if dtype is None:
        offered = " and ".join(p.name for p in PRECISION_TABLE.values() if p.torch_dtype is not None)
        others = " and ".join(p.name for p in PRECISION_TABLE.values() if p.torch_dtype is None)
        raise EdgekdError(f"--trt-via torch-tensorrt builds {offered} engines; for {others} use the ONNX route")
    module = model.eval().cuda()
    if dtype != torch.float32:  # the precision is in the graph itself, the interface stays float32
        module = _Typed(module, dtype)
    shape = tuple(input_shape)
    spec = torch_trt.Input(
        min_shape=(profile.min_batch, *shape),
        opt_shape=(profile.opt_batch, *shape),
        max_shape=(profile.max_batch, *shape),
        dtype=torch.float32,
    )
    settings: dict[str, Any] = {
        "ir": "dynamo",
        "inputs": [spec],
        "min_block_size": 1,
        "require_full_compilation": True,
        "workspace_size": int(workspace_bytes),
        "optimization_level": int(optimization_level),
    }
    if timing_cache:
        settings["timing_cache_path"] = str(timing_cache)
    try:
        compiled = torch_trt.compile(module, **settings)
    except Exception as exc:  # torch-tensorrt raises many types; keep the first line
        raise EdgekdError(f"torch-tensorrt compilation failed: {str(exc).strip().splitlines()[0][:300]}") from exc
    meta = {
        "torch_tensorrt_version": str(torch_trt.__version__),
        "settings": {k: v for k, v in settings.items() if k != "inputs"},
        "layers": _layer_census(compiled),
    }
    return compiled, meta


def _layer_census(compiled: torch.nn.Module) -> dict[str, Any]:
    """Merge the precision census of every TensorRT submodule that exposes ``get_layer_info``."""
    merged: dict[str, Any] = {"layers": {}, "compute_layers": {}, "compute_total": 0, "detailed": False}
    found = False
    for sub in compiled.modules():
        getter = getattr(sub, "get_layer_info", None)
        if getter is None:
            continue
        try:
            info = json.loads(getter())
        except Exception:  # older runtimes return plain text or need a context
            continue
        census = census_from_layer_info(info)
        found = True
        merged["detailed"] = (
            census["detailed"] if not merged["compute_total"] else merged["detailed"] and census["detailed"]
        )
        for key in ("layers", "compute_layers"):
            for prec, n in census[key].items():
                merged[key][prec] = merged[key].get(prec, 0) + n
        merged["compute_total"] += census["compute_total"]
    merged["available"] = found
    return merged


def save_torch_tensorrt(compiled: torch.nn.Module, path: str | os.PathLike, example: torch.Tensor) -> None:
    """Save the compiled program (ExportedProgram format, Python runtime) to ``path``."""
    torch_trt = import_torch_tensorrt()
    torch_trt.save(compiled, str(path), output_format="exported_program", arg_inputs=[example.cuda()])
