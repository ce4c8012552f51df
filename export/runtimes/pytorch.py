"""A PyTorch module as a ``Runtime``: run eagerly or through ``torch.compile``, optionally replayed as a CUDA graph."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from edgekd.errors import EdgekdError, MissingDependency
from edgekd.export.runtimes.base import Runtime, as_tensor, cuda_available

__all__ = ["TorchRuntime"]


class TorchRuntime(Runtime):
    """A PyTorch module run eagerly or through ``torch.compile``, optionally replayed as a CUDA graph."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: str = "cpu",
        compile: bool = False,
        compile_mode: str | None = None,
        cuda_graph: bool = False,
        half: bool = False,
    ) -> None:
        if device.startswith("cuda") and not cuda_available():
            raise MissingDependency("the torch CUDA backend needs an NVIDIA GPU; none is visible to torch")
        if cuda_graph and not device.startswith("cuda"):
            raise EdgekdError("CUDA graphs need --device cuda")
        self.device = device
        self.backend = "torch-compile" if compile else "torch"
        self.precision = "fp16" if half else "fp32"
        self.half = half
        self.cuda_graph = cuda_graph
        module = model.eval().to(device)
        if half:
            module = module.half()
        self.module = module
        self.fn = torch.compile(module, mode=compile_mode, dynamic=False) if compile else module
        self._stream = torch.cuda.Stream() if device.startswith("cuda") else None

    @property
    def stream(self) -> torch.cuda.Stream | None:
        return self._stream

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.fn(x.half() if self.half else x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        graph = getattr(self, "_graph", None)
        if graph is not None and tuple(x.shape) == tuple(self._graph_in.shape):
            with torch.cuda.stream(self._stream):  # end-to-end through the captured graph: copy in, replay, copy out
                self._graph_in.copy_(x.half() if self.half else x, non_blocking=True)
                graph.replay()
                out = self._graph_out.float().cpu()
            return out
        return self._run(x.to(self.device)).float().cpu()

    def prepare(self, x: torch.Tensor) -> Callable[[], Any]:
        staged = as_tensor(x).to(self.device)
        if self.half:
            staged = staged.half()
        if self._stream is None:
            return lambda: self._run_staged(staged)
        with torch.cuda.stream(self._stream):
            if not self.cuda_graph:
                return lambda: self._launch(staged)
            for _ in range(3):  # warm up on the side stream before capture (cuDNN autotuning, lazy init)
                self._run_staged(staged)
            self._stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, stream=self._stream):
                self._graph_out = self.fn(staged)
            self._graph, self._graph_in = graph, staged
            return graph.replay

    def _run_staged(self, staged: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.fn(staged)

    def _launch(self, staged: torch.Tensor) -> torch.Tensor:
        with torch.cuda.stream(self._stream):
            return self._run_staged(staged)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "cuda_graph": self.cuda_graph}
