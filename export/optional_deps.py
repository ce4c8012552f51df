"""The optional dependencies of the builders and runtimes: TensorRT and torch-tensorrt (the ``trt`` extra), and
ExecuTorch with its XNNPACK backend and torchao's PT2E quantization (the ``executorch`` extra).

They are imported here, inside functions, so that ``import edgekd.export`` works without them; a missing one (or one
whose native libraries do not load) is a one-line ``MissingDependency`` that says what to install.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import warnings
from collections.abc import Iterator
from types import ModuleType

from edgekd.errors import MissingDependency

__all__ = [
    "TRT_INSTALL_HINT",
    "TORCH_TRT_INSTALL_HINT",
    "EXECUTORCH_INSTALL_HINT",
    "import_tensorrt",
    "import_torch_tensorrt",
    "import_executorch",
    "trt_major",
]

TRT_INSTALL_HINT = "install the trt extra (pip install 'edgekd[trt]') on a machine with an NVIDIA GPU and driver"
EXECUTORCH_INSTALL_HINT = "install the executorch extra (pip install 'edgekd[executorch]')"
TORCH_TRT_INSTALL_HINT = (
    "install the trt extra (pip install 'edgekd[trt]', torch-tensorrt matching torch's minor version) on a "
    "machine with an NVIDIA GPU"
)


def import_tensorrt():
    """The ``tensorrt`` module, or a one-line ``MissingDependency`` when it (or a GPU for it) is missing."""
    try:
        import tensorrt as trt  # optional (the trt extra)
    except ImportError:
        raise MissingDependency(f"TensorRT is not installed: {TRT_INSTALL_HINT}") from None
    except OSError as exc:  # the wheel is there but libnvinfer / CUDA libraries are not loadable
        raise MissingDependency(f"TensorRT cannot load its libraries ({exc}); {TRT_INSTALL_HINT}") from None
    return trt


def import_torch_tensorrt():
    """The ``torch_tensorrt`` module, or a one-line ``MissingDependency``."""
    try:
        import torch_tensorrt  # optional (the trt extra)
    except ImportError:
        raise MissingDependency(f"torch-tensorrt is not installed: {TORCH_TRT_INSTALL_HINT}") from None
    except (OSError, RuntimeError) as exc:  # ABI mismatch with torch, missing TensorRT libraries
        raise MissingDependency(
            f"torch-tensorrt cannot load ({str(exc).splitlines()[0]}); {TORCH_TRT_INSTALL_HINT}"
        ) from None
    return torch_tensorrt


def trt_major(trt) -> int:
    """Major version of the imported TensorRT."""
    return int(str(trt.__version__).split(".")[0])


@contextlib.contextmanager
def _quiet_executorch_import() -> Iterator[None]:
    """ExecuTorch's Python runtime warns on import that it is experimental, its modules use deprecated importlib
    calls, and torchao (imported with its quantizer) logs a torch deprecation for every enum it registers; none of it
    says anything a user of edgekd can act on."""
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "This API is experimental")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        pytree_log.setLevel(level)


def import_executorch(module: str = "executorch") -> ModuleType:
    """``module``, one of ExecuTorch's (``executorch.exir``, ``executorch.runtime``, ...) or torchao's that the extra
    brings, or a one-line ``MissingDependency`` naming the extra."""
    try:
        with _quiet_executorch_import():
            return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        if importlib.util.find_spec(package) is None:
            raise MissingDependency(f"{package} is not installed: {EXECUTORCH_INSTALL_HINT}") from None
        raise MissingDependency(  # installed, but another version than the extra pins (a module moved or is missing)
            f"cannot import {module} ({str(exc).splitlines()[0][:200]}); {EXECUTORCH_INSTALL_HINT}"
        ) from None
    except OSError as exc:  # the wheel is there but its native libraries do not load (a torch ABI mismatch)
        raise MissingDependency(f"ExecuTorch cannot load its libraries ({exc}); {EXECUTORCH_INSTALL_HINT}") from None
