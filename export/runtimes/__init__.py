"""Runtimes: one ``Runtime`` interface over torch eager / torch.compile, ONNX Runtime (CPU, CUDA), TensorRT engines,
torch-tensorrt programs and ExecuTorch programs, opened through ``open_runtime(source, backend=None)``.

``base`` holds the interface, one module per backend family the implementation (``pytorch``, ``ort``, ``tensorrt``,
``torch_tensorrt``, ``executorch``), and ``registry`` the backend names, file kinds and ``open_runtime``. ONNX Runtime,
TensorRT, torch-tensorrt and ExecuTorch are imported only when a runtime of theirs is opened.
"""

from edgekd.export.runtimes.base import Runtime as Runtime
from edgekd.export.runtimes.executorch import ExecuTorchRuntime as ExecuTorchRuntime
from edgekd.export.runtimes.ort import OrtRuntime as OrtRuntime
from edgekd.export.runtimes.ort import ort_cuda_available as ort_cuda_available
from edgekd.export.runtimes.pytorch import TorchRuntime as TorchRuntime
from edgekd.export.runtimes.registry import BACKENDS as BACKENDS
from edgekd.export.runtimes.registry import FILE_KINDS as FILE_KINDS
from edgekd.export.runtimes.registry import file_kind as file_kind
from edgekd.export.runtimes.registry import open_runtime as open_runtime
from edgekd.export.runtimes.tensorrt import TensorRTRuntime as TensorRTRuntime
from edgekd.export.runtimes.torch_tensorrt import TorchTensorRTRuntime as TorchTensorRTRuntime
