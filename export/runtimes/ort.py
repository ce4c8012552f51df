"""An ONNX model in an ONNX Runtime session (CPU or CUDA provider) as a ``Runtime``.

The session runs the model's input contract (``edgekd.export.contract``): a fixed-batch graph is fed in chunks of its
batch, a foreign graph traced at batch 1 is found out at load and run one image at a time, and on the CPU the exact
``edgekd.export.passes.ort_cpu`` rewrites are applied at load unless the caller asks for the graph as written.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from edgekd.errors import EdgekdError, EdgekdWarning, MissingDependency
from edgekd.export.contract import EDGEKD_SOURCE, graph_precision, read_contract
from edgekd.export.passes.onnx import load_onnx
from edgekd.export.passes.ort_cpu import rewrite_for_ort_cpu
from edgekd.export.runtimes.base import Runtime, as_tensor, check_image_shape, cuda_available, run_in_fixed_batches
from edgekd.utils.env import onnxruntime_conflict

__all__ = ["OrtRuntime", "ort_cuda_available"]


def ort_cuda_available() -> bool:
    """True when ONNX Runtime has the CUDA provider *and* a GPU exists (the -gpu wheel lists it either way)."""
    import onnxruntime as ort  # loaded when asked, not with edgekd.export (start-up time)

    return cuda_available() and "CUDAExecutionProvider" in ort.get_available_providers()


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
            cpu_rewrites: on the CPU, apply ``edgekd.export.passes.ort_cpu.rewrite_for_ort_cpu`` (PReLU and narrow
                grouped convolutions into ops that stay on ONNX Runtime's blocked layout; exact up to float rounding) at
                load.
                Gates turn it off to run the artifact exactly as written.
        """
        import onnxruntime as ort  # loaded when a session opens, not with edgekd.export (start-up time)

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
        self.contract = read_contract(proto, self.name)
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
    def _load_proto(model: str | os.PathLike | bytes) -> onnx.ModelProto:
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

    def _rewrite_for_cpu(self, proto, source: str | bytes) -> str | bytes:
        rewritten, self.rewrites = rewrite_for_ort_cpu(copy.deepcopy(proto))
        return rewritten.SerializeToString() if any(self.rewrites.values()) else source

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
        check_image_shape(x, self.contract.graph_size, self.name)
        return run_in_fixed_batches(self._run, x, self.contract.batch)

    def prepare(self, x: torch.Tensor) -> Callable[[], Any]:
        x = as_tensor(x)
        check_image_shape(x, self.contract.graph_size, self.name)
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
