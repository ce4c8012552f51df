"""The second TensorRT route: compile the PyTorch model with torch-tensorrt (dynamo path) instead of parsing ONNX.

FP32 compiles the model as is; FP16 compiles ``x.half() -> model.half() -> out.float()``, so the precision is in
the graph itself (torch-tensorrt >= 2.13 ignores ``enabled_precisions`` on the dynamo path, reference/export.md §3.2)
and the interface stays float32. ``require_full_compilation`` keeps every op inside TensorRT. INT8 needs ModelOpt
fake-quant modules and is not offered on this route; use the ONNX route (``--trt`` with ``--precision int8``).

The compiled program is saved with ``torch_tensorrt.save`` (ExportedProgram format) and gated exactly like an engine
built from ONNX. ``torch_tensorrt`` is imported inside the functions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from edgekd.errors import EdgekdError, MissingDependency

__all__ = ["import_torch_tensorrt", "compile_torch_tensorrt", "save_torch_tensorrt", "TorchTensorRTRuntime"]

_HINT = (
    "install the trt extra (pip install 'edgekd[trt]', torch-tensorrt matching torch's minor version) on a "
    "machine with an NVIDIA GPU"
)


def import_torch_tensorrt():
    """The ``torch_tensorrt`` module, or a one-line ``MissingDependency``."""
    try:
        import torch_tensorrt
    except ImportError:
        raise MissingDependency(f"torch-tensorrt is not installed: {_HINT}") from None
    except (OSError, RuntimeError) as exc:  # ABI mismatch with torch, missing TensorRT libraries
        raise MissingDependency(f"torch-tensorrt cannot load ({str(exc).splitlines()[0]}); {_HINT}") from None
    return torch_tensorrt


class _HalfWrapper(torch.nn.Module):
    """float32 in, float32 out, FP16 inside."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def compile_torch_tensorrt(
    model: torch.nn.Module,
    input_shape: tuple[int, int, int],
    precision: str,
    profile,
    *,
    workspace_bytes: int = 1 << 30,
    optimization_level: int = 3,
    timing_cache: str | os.PathLike | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Compile ``model`` for batches in ``profile`` (an ``EngineProfile``).

    Returns:
        The compiled module (CUDA, float32 in/out) and a metadata dict (versions, settings, layer census if the
        engines expose detailed layer information).
    """
    torch_trt = import_torch_tensorrt()
    if not torch.cuda.is_available():
        raise MissingDependency(f"torch-tensorrt needs an NVIDIA GPU; none is visible. {_HINT}")
    if precision not in ("fp32", "fp16"):
        raise EdgekdError("--trt-via torch-tensorrt builds fp32 and fp16 engines; for int8 use the ONNX route")
    module = model.eval().cuda()
    if precision == "fp16":
        module = _HalfWrapper(module)
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
    from edgekd.export.tensorrt import census_from_layer_info

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


class TorchTensorRTRuntime:
    """A saved torch-tensorrt program as a ``Runtime`` (see ``edgekd.export.runtime``)."""

    backend = "torch-tensorrt"
    device = "cuda"

    def __init__(self, source: str | os.PathLike | torch.nn.Module, precision: str = "fp32") -> None:
        from edgekd.export.runtime import TorchRuntime

        if isinstance(source, torch.nn.Module):
            module = source
        else:
            torch_trt = import_torch_tensorrt()
            if not Path(source).is_file():
                raise EdgekdError(f"torch-tensorrt program {source} does not exist")
            module = torch_trt.load(str(source)).module()
        self._inner = TorchRuntime(module, device="cuda")
        self._inner.backend = self.backend
        self.precision = precision

    def __call__(self, x):
        return self._inner(x)

    def prepare(self, x):
        return self._inner.prepare(x)

    @property
    def stream(self):
        return self._inner.stream

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "device": self.device, "precision": self.precision}
