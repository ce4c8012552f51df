"""A torch-tensorrt program (compiled in memory, or saved by ``edgekd export --trt --trt-via torch-tensorrt``) as a
``Runtime``: a ``TorchRuntime`` on CUDA around the program's module. ``torch_tensorrt`` is imported through
``edgekd.export.optional_deps``, and only to load a saved program.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edgekd.errors import EdgekdError
from edgekd.export.optional_deps import import_torch_tensorrt
from edgekd.export.runtimes.base import Runtime
from edgekd.export.runtimes.pytorch import TorchRuntime

__all__ = ["TorchTensorRTRuntime"]


class TorchTensorRTRuntime(Runtime):
    """A compiled torch-tensorrt module, or the path of a saved program, run through ``TorchRuntime`` on CUDA."""

    backend = "torch-tensorrt"
    device = "cuda"

    def __init__(self, source: str | os.PathLike | torch.nn.Module, precision: str = "fp32") -> None:
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

    def prepare(self, x: torch.Tensor) -> Callable[[], Any]:
        return self._inner.prepare(x)

    @property
    def stream(self) -> torch.cuda.Stream | None:
        return self._inner.stream
