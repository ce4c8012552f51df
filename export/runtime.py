"""One runtime interface over torch eager / torch.compile, ONNX Runtime (CPU, CUDA) and TensorRT engines.

A ``Runtime`` is a callable: normalized float32 images ``(B, C, H, W)`` (a torch tensor or a numpy array) in, float32
embeddings ``(B, D)`` on the CPU out, so ``edgekd.eval.embed`` and the gates use every backend the same way. For
latency measurement it also offers ``prepare(x)``, which puts one input batch where the backend reads it (device
memory on CUDA) and returns a zero-argument ``step`` that launches one inference without copies or synchronization.

ONNX Runtime and TensorRT are imported inside the functions that need them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgekd.errors import EdgekdError, EdgekdWarning, MissingDependency
from edgekd.export.contract import EDGEKD_SOURCE, InputContract, graph_precision, read_contract
from edgekd.utils.env import onnxruntime_conflict

__all__ = [
    "BACKENDS",
    "Runtime",
    "TorchRuntime",
    "OrtRuntime",
    "TensorRTRuntime",
    "load_runtime",
    "open_runtime",
    "read_contract_or_fail",
    "cuda_available",
    "ort_cuda_available",
]

BACKENDS = ("torch", "torch-compile", "ort-cpu", "ort-cuda", "tensorrt", "torch-tensorrt")
TRT_INSTALL_HINT = "install the trt extra (pip install 'edgekd[trt]') on a machine with an NVIDIA GPU"


def cuda_available() -> bool:
    """True when torch sees a CUDA device."""
    return torch.cuda.is_available()


def ort_cuda_available() -> bool:
    """True when ONNX Runtime has the CUDA provider *and* a GPU exists (the -gpu wheel lists it either way)."""
    import onnxruntime as ort

    return cuda_available() and "CUDAExecutionProvider" in ort.get_available_providers()


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype != torch.float32:
        raise EdgekdError(f"a runtime takes normalized float32 images, got {x.dtype}")
    if x.dim() != 4:
        raise EdgekdError(f"a runtime takes (B, C, H, W) images, got shape {tuple(x.shape)}")
    return x


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
        return self._forward(_as_tensor(x).cpu())

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

    def _read_contract(self, meta: dict[str, Any]) -> None:
        """Set ``mean``/``std``/``input_size`` from metadata values (JSON strings or lists)."""
        import json

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
        staged = _as_tensor(x).to(self.device)
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


class OrtRuntime(Runtime):
    """An ONNX model in an ONNX Runtime session (CPU or CUDA provider), all graph optimizations on."""

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        device: str = "cpu",
        threads: int | None = None,
        optimization: str = "all",
        precision: str | None = None,
        cpu_rewrites: bool = True,
    ) -> None:
        """Open an ONNX model.

        Args:
            model: a path or serialized bytes.
            device: ``cpu`` or ``cuda[:N]``.
            threads: intra-op threads (None: ONNX Runtime's default).
            optimization: graph optimization level, ``disable``/``basic``/``extended``/``all``.
            precision: label for reports (default: the model's ``precision`` metadata).
            cpu_rewrites: on the CPU, apply ``edgekd.export.ort_cpu.rewrite_for_ort_cpu`` (PReLU and narrow grouped
                convolutions into ops that stay on ONNX Runtime's blocked layout; exact up to float rounding) at load.
                Gates turn it off to run the artifact exactly as written.
        """
        import onnxruntime as ort

        conflict = onnxruntime_conflict()
        if conflict:
            warnings.warn(conflict, EdgekdWarning, stacklevel=2)  # Python's filter shows it once per process
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        opts = ort.SessionOptions()
        opts.graph_optimization_level = levels[optimization]
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 4  # fatal only: a failed run raises, and its one-line error says what ORT logged
        self.threads = threads
        self.device = device
        self._stream = None
        if device.startswith("cuda"):
            if not ort_cuda_available():
                raise MissingDependency("ONNX Runtime CUDA needs onnxruntime-gpu and an NVIDIA GPU; none is visible")
            self._stream = torch.cuda.Stream()
            index = torch.device(device).index or 0
            cuda_opts = {
                "device_id": index,
                "cudnn_conv_algo_search": "EXHAUSTIVE",
                "user_compute_stream": str(self._stream.cuda_stream),
            }
            providers: list = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
            self.backend = "ort-cuda"
        else:
            providers = ["CPUExecutionProvider"]
            self.backend = "ort-cpu"
        self.name = "the model" if isinstance(model, bytes) else Path(model).name
        proto = self._load_proto(model)
        self.contract = read_contract_or_fail(proto, self.name)
        source = model if isinstance(model, bytes) else str(model)
        self.rewrites: dict[str, int] = {}
        if cpu_rewrites and not device.startswith("cuda"):
            source = self._rewrite_for_cpu(proto, source)
        try:
            self.session = ort.InferenceSession(source, sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise EdgekdError(f"ONNX Runtime cannot load {self.name}: {reason}") from None
        if device.startswith("cuda") and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise MissingDependency("ONNX Runtime did not enable its CUDA provider (check the CUDA/cuDNN libraries)")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.precision = precision or meta.get("precision") or graph_precision(proto)
        self.metadata = meta
        self.notes: list[str] = []  # one-line findings about the model a command should show the user
        self._probe_batch()
        self.set_contract(self.contract)

    @property
    def stream(self) -> torch.cuda.Stream | None:
        return self._stream

    @staticmethod
    def _load_proto(model: str | os.PathLike | bytes):
        import onnx

        from edgekd.export.onnx import load_onnx

        if isinstance(model, bytes):
            try:
                return onnx.load_from_string(model)
            except Exception:  # protobuf's DecodeError and friends
                raise EdgekdError("the serialized ONNX model cannot be parsed") from None
        return load_onnx(model)

    def _probe_batch(self) -> None:
        """A foreign graph that declares a dynamic batch but was traced at batch 1 (arcface_torch's torch2onnx,
        reference/face.md §0.3) fails at batch 2: find that out once, at load, and run it one image at a time."""
        contract = self.contract
        if contract.source == EDGEKD_SOURCE or contract.batch is not None or contract.graph_size is None:
            return
        try:
            self._run(torch.zeros(2, *contract.graph_size))
        except EdgekdError:
            self._run(torch.zeros(1, *contract.graph_size))  # a graph that runs at no batch fails here, in one line
            self.contract = replace(contract, batch=1)
            self.notes.append(
                f"{self.name} declares a dynamic batch but runs only batch 1 (traced at batch 1, as arcface_torch's "
                "torch2onnx does); running it one image at a time"
            )

    def set_contract(self, contract: InputContract) -> None:
        """Use ``contract`` (e.g. with the user's overrides applied) as this runtime's input contract."""
        self.contract = contract
        self.mean, self.std, self.input_size = contract.mean, contract.std, contract.input_size

    def _rewrite_for_cpu(self, proto, source: str | bytes) -> str | bytes:
        import copy

        from edgekd.export.ort_cpu import rewrite_for_ort_cpu

        rewritten, self.rewrites = rewrite_for_ort_cpu(copy.deepcopy(proto))
        return rewritten.SerializeToString() if any(self.rewrites.values()) else source

    def _check_shape(self, x: torch.Tensor) -> None:
        """A one-line error naming both shapes, instead of ONNX Runtime's traceback, when the graph fixes another."""
        fixed = self.contract.graph_size
        if fixed is not None and tuple(x.shape[1:]) != fixed:
            got = "x".join(map(str, x.shape[1:]))
            raise EdgekdError(
                f"{self.name} takes {'x'.join(map(str, fixed))} (CxHxW) images, got {got}; "
                f"make the data {fixed[1]}x{fixed[2]} (e.g. --image-size {fixed[1]})"
            )

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.session.run([self.output_name], {self.input_name: x.numpy()})[0]
        except Exception as exc:  # ORT raises its own exception types, with a C++ trace in the message
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            # arcface_torch's torch2onnx renames the batch axis of a graph traced at batch 1 (reference/face.md §0.3)
            hint = "; if its graph was traced at batch 1, pass --batch-size 1" if len(x) > 1 else ""
            raise EdgekdError(f"ONNX Runtime failed on {self.name} at batch {len(x)}: {reason}{hint}") from None
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_shape(x)
        batch = self.contract.batch
        if batch is None or len(x) == batch:
            return self._run(x)
        outs = []
        for lo in range(0, len(x), batch):  # a fixed-batch graph takes exactly `batch` rows: chunk, pad the last
            chunk = x[lo : lo + batch]
            rows = len(chunk)
            if rows < batch:
                chunk = torch.cat([chunk, chunk.new_zeros(batch - rows, *chunk.shape[1:])])
            outs.append(self._run(chunk)[:rows])
        return torch.cat(outs)

    def prepare(self, x: torch.Tensor) -> Callable[[], Any]:
        x = _as_tensor(x)
        self._check_shape(x)
        if self.contract.batch is not None and len(x) != self.contract.batch:
            raise EdgekdError(f"{self.name} has a fixed batch of {self.contract.batch}; it cannot time batch {len(x)}")
        if self._stream is None:
            feed = {self.input_name: np.ascontiguousarray(x.numpy())}
            names = [self.output_name]
            return lambda: self.session.run(names, feed)
        staged = x.to(self.device)
        out_shape = (x.shape[0], self.session.get_outputs()[0].shape[1])
        out = torch.empty(out_shape, dtype=torch.float32, device=self.device)
        index = staged.device.index or 0
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", index, np.float32, tuple(staged.shape), staged.data_ptr())
        binding.bind_output(self.output_name, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        self._keep = (staged, out, binding)
        torch.cuda.synchronize()  # staged input complete before ORT's stream reads it
        return lambda: self.session.run_with_iobinding(binding)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "intra_op_threads": self.threads,
            "providers": self.session.get_providers(),
            "cpu_rewrites": self.rewrites,
        }


class TensorRTRuntime(Runtime):
    """A serialized TensorRT engine (``.plan``) run with ``execute_async_v3`` on a torch-owned CUDA stream."""

    backend = "tensorrt"
    device = "cuda"

    def __init__(self, plan: str | os.PathLike | bytes, precision: str | None = None) -> None:
        from edgekd.export.tensorrt import import_tensorrt

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
            import json

            info = json.loads(sidecar.read_text())
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
        staged = _as_tensor(x).to("cuda").contiguous()
        out = self._bind(staged)
        self._keep = (staged, out)
        torch.cuda.synchronize()  # staged input complete before steps run on self._stream
        handle = self._stream.cuda_stream
        return lambda: self.context.execute_async_v3(handle)


def read_contract_or_fail(proto, name: str) -> InputContract:
    """``read_contract`` with the file's name in its one-line error."""
    try:
        return read_contract(proto)
    except EdgekdError as exc:
        raise EdgekdError(f"{name}: {exc}") from None


def load_runtime(
    source: str | os.PathLike | torch.nn.Module,
    backend: str,
    *,
    device: str | None = None,
    threads: int | None = None,
    model_name: str | None = None,
    cuda_graph: bool = False,
) -> Runtime:
    """Open ``source`` with ``backend`` (one of ``BACKENDS``).

    Args:
        source: an nn.Module or a checkpoint (``.safetensors``) for the torch backends, an ``.onnx`` file for
            ``ort-*``, a ``.plan`` for ``tensorrt``, a saved torch-tensorrt program for ``torch-tensorrt``.
        backend: backend name.
        device: ``cpu`` or ``cuda``; defaults to the backend's natural device.
        threads: ONNX Runtime intra-op threads (torch uses ``torch.set_num_threads``).
        model_name: architecture of a plain arcface_torch ``.pt`` checkpoint.
        cuda_graph: replay torch backends as CUDA graphs.
    """
    if backend not in BACKENDS:
        raise EdgekdError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in ("torch", "torch-compile"):
        module = source if isinstance(source, torch.nn.Module) else _load_backbone(source, model_name)
        return TorchRuntime(module, device=device or "cpu", compile=backend == "torch-compile", cuda_graph=cuda_graph)
    if isinstance(source, torch.nn.Module):
        raise EdgekdError(f"backend {backend} needs a file, not a module")
    if backend in ("ort-cpu", "ort-cuda"):
        return OrtRuntime(source, device="cuda" if backend == "ort-cuda" else "cpu", threads=threads)
    if backend == "tensorrt":
        return TensorRTRuntime(source)
    from edgekd.export.torch_tensorrt import TorchTensorRTRuntime

    return TorchTensorRTRuntime(source)


def open_runtime(path: str | os.PathLike, device: str = "auto", threads: int | None = None) -> Runtime:
    """Open an exported artifact by its suffix: ``.onnx`` with ONNX Runtime (CUDA when ``device`` allows and one is
    there), ``.plan``/``.engine`` with TensorRT. The runtime's ``mean``/``std`` come from the artifact's metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise EdgekdError(f"{path} does not exist")
    if path.suffix == ".onnx":
        want_cuda = device.startswith("cuda") or (device == "auto" and ort_cuda_available())
        return OrtRuntime(
            path, device=device if device.startswith("cuda") else ("cuda" if want_cuda else "cpu"), threads=threads
        )
    if path.suffix in (".plan", ".engine"):
        return TensorRTRuntime(path)
    raise EdgekdError(f"cannot open {path}: expected an .onnx file or a TensorRT .plan/.engine")


def _load_backbone(path: str | os.PathLike, model_name: str | None) -> torch.nn.Module:
    from edgekd.bundle import load_bundle

    return load_bundle(path, model=model_name).backbone
