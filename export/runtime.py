"""One runtime interface over torch eager / torch.compile, ONNX Runtime (CPU, CUDA) and TensorRT engines.

A ``Runtime`` is a callable: normalized float32 images ``(B, C, H, W)`` (a torch tensor or a numpy array) in, float32
embeddings ``(B, D)`` on the CPU out, so ``edgekd.eval.embed`` and the gates use every backend the same way. For
latency measurement it also offers ``prepare(x)``, which puts one input batch where the backend reads it (device
memory on CUDA) and returns a zero-argument ``step`` that launches one inference without copies or synchronization.

ONNX Runtime and TensorRT are imported inside the functions that need them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgekd.errors import EdgekdError, MissingDependency

__all__ = [
    "BACKENDS",
    "Runtime",
    "TorchRuntime",
    "OrtRuntime",
    "TensorRTRuntime",
    "load_runtime",
    "open_runtime",
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
        opts.log_severity_level = 3
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
        source = model if isinstance(model, bytes) else str(model)
        if not isinstance(model, bytes) and not Path(model).is_file():
            raise EdgekdError(f"ONNX model {model} does not exist")
        self.rewrites: dict[str, int] = {}
        if cpu_rewrites and not device.startswith("cuda"):
            source = self._rewrite_for_cpu(source)
        try:
            self.session = ort.InferenceSession(source, sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types
            raise EdgekdError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0][:300]}") from None
        if device.startswith("cuda") and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise MissingDependency("ONNX Runtime did not enable its CUDA provider (check the CUDA/cuDNN libraries)")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.precision = precision or meta.get("precision", "fp32")
        self.metadata = meta
        self._read_contract(meta)

    @property
    def stream(self) -> torch.cuda.Stream | None:
        return self._stream

    def _rewrite_for_cpu(self, source: str | bytes) -> str | bytes:
        import onnx

        from edgekd.export.ort_cpu import rewrite_for_ort_cpu

        proto = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(source)
        proto, self.rewrites = rewrite_for_ort_cpu(proto)
        return proto.SerializeToString() if any(self.rewrites.values()) else source

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run([self.output_name], {self.input_name: x.numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def prepare(self, x: torch.Tensor) -> Callable[[], Any]:
        x = _as_tensor(x)
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
