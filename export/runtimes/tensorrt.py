"""A serialized TensorRT engine (``.plan``) as a ``Runtime``, run with ``execute_async_v3`` on a torch-owned stream.

An engine records no input contract of its own: the sidecar ``<plan>.json`` that ``edgekd export --trt`` writes beside
it gives the precision and the model's mean, std and input size. ``tensorrt`` is imported through
``edgekd.export.optional_deps``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edgekd.errors import EdgekdError, MissingDependency
from edgekd.export.optional_deps import TRT_INSTALL_HINT, import_tensorrt
from edgekd.export.runtimes.base import Runtime, as_tensor, cuda_available
from edgekd.formats import read_versioned_json

__all__ = ["TensorRTRuntime"]


class TensorRTRuntime(Runtime):
    """A serialized TensorRT engine (``.plan``) run with ``execute_async_v3`` on a torch-owned CUDA stream."""

    backend = "tensorrt"
    device = "cuda"

    def __init__(self, plan: str | os.PathLike | bytes, precision: str | None = None) -> None:
        trt = import_tensorrt()
        if not cuda_available():
            raise MissingDependency(f"running a TensorRT engine needs an NVIDIA GPU; {TRT_INSTALL_HINT}")
        data = plan if isinstance(plan, bytes) else Path(plan).read_bytes()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise EdgekdError("TensorRT could not deserialize the engine (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == mode)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) != mode)
        self.precision = precision or "fp32"
        self._stream = torch.cuda.Stream()
        self._trt = trt
        sidecar = Path(f"{plan}.json") if not isinstance(plan, bytes) else None
        if sidecar is not None and sidecar.is_file():
            info = read_versioned_json("export_sidecar", sidecar)
            self.precision = precision or info.get("precision", self.precision)
            self._read_contract(info.get("model", {}))

    @property
    def stream(self) -> torch.cuda.Stream | None:
        return self._stream

    def _bind(self, staged: torch.Tensor) -> torch.Tensor:
        self.context.set_input_shape(self.input_name, tuple(staged.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.input_name, staged.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        staged = x.to("cuda", non_blocking=True).contiguous()
        out = self._bind(staged)
        self._stream.wait_stream(torch.cuda.current_stream())  # the copy-in runs on the current stream
        with torch.cuda.stream(self._stream):
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise EdgekdError("TensorRT execution failed")
        self._stream.synchronize()
        return out.cpu()

    def prepare(self, x: torch.Tensor) -> Callable[[], Any]:
        staged = as_tensor(x).to("cuda").contiguous()
        out = self._bind(staged)
        self._keep = (staged, out)
        torch.cuda.synchronize()  # staged input complete before steps run on self._stream
        handle = self._stream.cuda_stream
        return lambda: self.context.execute_async_v3(handle)
