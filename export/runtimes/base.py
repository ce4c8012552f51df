"""The ``Runtime`` interface every backend implements.

A ``Runtime`` is a callable: normalized float32 images ``(B, C, H, W)`` (a torch tensor or a numpy array) in, float32
embeddings ``(B, D)`` on the CPU out, so ``edgekd.eval.embed`` and the gates use every backend the same way. For
latency measurement it also offers ``prepare(x)``, which puts one input batch where the backend reads it (device
memory on CUDA) and returns a zero-argument ``step`` that launches one inference without copies or synchronization.

A runtime over a file that records its input contract (ONNX Runtime, ExecuTorch) keeps it as ``contract``
(``edgekd.export.contract.InputContract``); ``check_image_shape`` and ``run_in_fixed_batches`` are how such a runtime
meets a graph that fixes its image size or its batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from edgekd.errors import EdgekdError
from edgekd.export.contract import InputContract

__all__ = ["Runtime", "as_tensor", "cuda_available", "check_image_shape", "run_in_fixed_batches"]


def cuda_available() -> bool:
    """True when torch sees a CUDA device."""
    return torch.cuda.is_available()


def as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``x`` as a torch tensor, checked to be float32 ``(B, C, H, W)``."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype != torch.float32:
        raise EdgekdError(f"a runtime takes normalized float32 images, got {x.dtype}")
    if x.dim() != 4:
        raise EdgekdError(f"a runtime takes (B, C, H, W) images, got shape {tuple(x.shape)}")
    return x


def check_image_shape(x: torch.Tensor, fixed: tuple[int, int, int] | None, name: str) -> None:
    """A one-line error naming both shapes, instead of the runtime's own traceback, when the graph fixes another
    ``(C, H, W)`` than ``x`` has (``fixed`` None: any size)."""
    if fixed is not None and tuple(x.shape[1:]) != fixed:
        got = "x".join(map(str, x.shape[1:]))
        raise EdgekdError(
            f"{name} takes {'x'.join(map(str, fixed))} (CxHxW) images, got {got}; "
            f"make the data {fixed[1]}x{fixed[2]} (e.g. --image-size {fixed[1]})"
        )


def run_in_fixed_batches(
    run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int | None
) -> torch.Tensor:
    """``run`` over ``x`` when the graph takes exactly ``batch`` rows (None: any number): in chunks of ``batch``, the
    last one padded with zeros and its padding rows dropped from the output."""
    if batch is None or len(x) == batch:
        return run(x)
    outs = []
    for lo in range(0, len(x), batch):
        chunk = x[lo : lo + batch]
        rows = len(chunk)
        if rows < batch:
            chunk = torch.cat([chunk, chunk.new_zeros(batch - rows, *chunk.shape[1:])])
        outs.append(run(chunk)[:rows])
    return torch.cat(outs)


class Runtime:
    """Base class: ``backend``, ``device``, ``precision`` and the call/prepare contract described in the module.

    Subclasses implement ``_forward(x)`` for a float32 CPU tensor and ``prepare(x)``.
    """

    backend: str = "?"
    device: str = "cpu"
    precision: str = "fp32"
    mean: tuple[float, ...] | None = None  # the input contract, when the artifact records it
    std: tuple[float, ...] | None = None
    input_size: tuple[int, ...] | None = None

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Embeddings ``(B, D)`` float32 on the CPU for normalized images ``x: (B, C, H, W)``."""
        return self._forward(as_tensor(x).cpu())

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, x: torch.Tensor) -> Callable[[], Any]:
        """Stage ``x`` for repeated timing and return ``step()``, which runs one inference on the staged input.

        On CUDA backends ``step`` only enqueues work on ``self.stream``; the caller synchronizes.
        """
        raise NotImplementedError

    @property
    def stream(self) -> torch.cuda.Stream | None:
        """The CUDA stream ``step`` enqueues on (None on the CPU)."""
        return None

    def describe(self) -> dict[str, Any]:
        """What the JSON reports record about this runtime."""
        return {"backend": self.backend, "device": self.device, "precision": self.precision}

    def set_contract(self, contract: InputContract) -> None:
        """Use ``contract`` (e.g. with the user's overrides applied) as this runtime's input contract."""
        self.contract = contract
        self.mean, self.std, self.input_size = contract.mean, contract.std, contract.input_size

    def _read_contract(self, meta: dict[str, Any]) -> None:
        """Set ``mean``/``std``/``input_size`` from metadata values (JSON strings or lists)."""

        def value(key):
            v = meta.get(key)
            return json.loads(v) if isinstance(v, str) else v

        try:
            if meta.get("mean") is not None:
                self.mean = tuple(float(v) for v in value("mean"))
                self.std = tuple(float(v) for v in value("std"))
            if meta.get("input_size") is not None:
                self.input_size = tuple(int(v) for v in value("input_size"))
        except (TypeError, ValueError):
            pass
