"""The one way to open a model as a ``Runtime``: ``open_runtime(source, backend=None)``, over the backend registry.

``BACKENDS`` names every backend, the kind of file it runs and the device it runs on; ``FILE_KINDS`` maps each kind to
the suffixes that mark it. Given no backend, ``open_runtime`` picks it from the source: a module or a checkpoint runs
in PyTorch, an ``.onnx`` file in ONNX Runtime (on CUDA when ``device`` allows and a GPU is there), a ``.plan`` /
``.engine`` in TensorRT, an ``.ep`` program in torch-tensorrt and a ``.pte`` program in ExecuTorch. The CLI's choices
and ``benchmark-latency``'s backends come from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from edgekd.bundle import load_bundle
from edgekd.errors import EdgekdError
from edgekd.export.runtimes.base import Runtime, cuda_available
from edgekd.export.runtimes.executorch import ExecuTorchRuntime
from edgekd.export.runtimes.ort import OrtRuntime, ort_cuda_available
from edgekd.export.runtimes.pytorch import TorchRuntime
from edgekd.export.runtimes.tensorrt import TensorRTRuntime
from edgekd.export.runtimes.torch_tensorrt import TorchTensorRTRuntime

__all__ = ["FILE_KINDS", "Backend", "BACKENDS", "file_kind", "open_runtime"]

# kind of model file -> the suffixes that mark it
FILE_KINDS: dict[str, tuple[str, ...]] = {
    "checkpoint": (".safetensors", ".pt", ".pth"),  # an edgekd bundle, or an arcface_torch state_dict with --model
    "onnx": (".onnx",),
    "engine": (".plan", ".engine"),  # a serialized TensorRT engine
    "program": (".ep",),  # a saved torch-tensorrt ExportedProgram
    "executorch": (".pte",),  # an ExecuTorch program (edgekd export --target executorch)
}


@dataclass(frozen=True)
class Backend:
    """A way to run a model.

    Attributes:
        name: as on the command line.
        runs: the ``FILE_KINDS`` key of what it runs (``checkpoint`` also stands for an in-memory module).
        device: the device it always runs on; None when the caller chooses (the torch backends).
        timed: offered by ``benchmark-latency``.
    """

    name: str
    runs: str
    device: str | None
    timed: bool = True


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("torch", "checkpoint", None),
        Backend("torch-compile", "checkpoint", None),
        Backend("ort-cpu", "onnx", "cpu"),
        Backend("ort-cuda", "onnx", "cuda"),
        Backend("tensorrt", "engine", "cuda"),
        Backend("torch-tensorrt", "program", "cuda", timed=False),
        Backend("executorch", "executorch", "cpu"),
    )
}


def file_kind(path: str | os.PathLike) -> str | None:
    """The ``FILE_KINDS`` key that ``path``'s suffix marks, None for any other suffix."""
    suffix = Path(path).suffix
    return next((kind for kind, suffixes in FILE_KINDS.items() if suffix in suffixes), None)


def _pick_backend(source: str | os.PathLike | torch.nn.Module, device: str) -> str:
    if isinstance(source, torch.nn.Module):
        return "torch"
    kind = file_kind(source)
    if kind == "onnx":
        cuda = device.startswith("cuda") or (device == "auto" and ort_cuda_available())
        return "ort-cuda" if cuda else "ort-cpu"
    if kind is None:
        raise EdgekdError(
            f"cannot open {source}: expected an .onnx file, a TensorRT .plan/.engine, a torch-tensorrt .ep, an "
            f"ExecuTorch .pte or a checkpoint ({'/'.join(FILE_KINDS['checkpoint'])})"
        )
    return next(name for name, backend in BACKENDS.items() if backend.runs == kind)


def open_runtime(
    source: str | os.PathLike | torch.nn.Module,
    backend: str | None = None,
    *,
    device: str = "auto",
    threads: int | None = None,
    precision: str | None = None,
    model_name: str | None = None,
    cuda_graph: bool = False,
    cpu_rewrites: bool = True,
) -> Runtime:
    """Open ``source`` as a ``Runtime``.

    Args:
        source: an ``nn.Module`` or a checkpoint (torch backends; a compiled module for ``torch-tensorrt``), an
            ``.onnx`` file (``ort-*``), a ``.plan``/``.engine`` (``tensorrt``), a saved program (``torch-tensorrt``)
            or an ExecuTorch ``.pte`` (``executorch``).
        backend: a key of ``BACKENDS``; None picks it from the source (see the module docstring). A named backend
            takes the file whatever its suffix (the gates open artifacts under their temporary names).
        device: ``auto``, ``cpu`` or ``cuda[:N]``; where the torch backends run (``auto``: CUDA when torch sees one)
            and whether an ``.onnx`` file opens on ONNX Runtime's CUDA provider. Other backends have a fixed device.
        threads: ONNX Runtime intra-op threads, ExecuTorch's thread pool (torch uses ``torch.set_num_threads``).
        precision: label for reports (default: what the artifact records).
        model_name: architecture of a plain arcface_torch ``.pt`` checkpoint.
        cuda_graph: replay the torch backends as CUDA graphs.
        cpu_rewrites: ONNX Runtime on the CPU applies ``edgekd.export.passes.ort_cpu`` at load (off: the graph as
            written).

    Raises:
        EdgekdError: a missing file, an unknown backend or suffix, or a module given to a file-only backend.
        MissingDependency: the backend needs a GPU, TensorRT, torch-tensorrt or ExecuTorch that is not there.
    """
    is_module = isinstance(source, torch.nn.Module)
    if not is_module and not Path(source).is_file():
        raise EdgekdError(f"{source} does not exist")
    backend = backend or _pick_backend(source, device)
    if backend not in BACKENDS:
        raise EdgekdError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    runs = BACKENDS[backend].runs
    if is_module and runs not in ("checkpoint", "program"):
        raise EdgekdError(f"backend {backend} needs a file, not a module")
    if runs == "checkpoint":
        module = source if is_module else load_bundle(source, model=model_name).backbone
        where = device if device != "auto" else ("cuda" if cuda_available() else "cpu")
        return TorchRuntime(module, device=where, compile=backend == "torch-compile", cuda_graph=cuda_graph)
    if runs == "onnx":
        where = "cpu" if backend == "ort-cpu" else (device if device.startswith("cuda") else "cuda")
        return OrtRuntime(source, device=where, threads=threads, precision=precision, cpu_rewrites=cpu_rewrites)
    if runs == "engine":
        return TensorRTRuntime(source, precision=precision)
    if runs == "executorch":
        return ExecuTorchRuntime(source, threads=threads, precision=precision)
    return TorchTensorRTRuntime(source, precision=precision or "fp32")
