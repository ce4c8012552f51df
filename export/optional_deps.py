"""TensorRT and torch-tensorrt, the optional dependencies of the engine builders and runtimes (the ``trt`` extra).

They are imported here, inside functions, so that ``import edgekd.export`` works without them; a missing one (or one
whose CUDA libraries do not load) is a one-line ``MissingDependency`` that says what to install.
"""

from __future__ import annotations

from edgekd.errors import MissingDependency

__all__ = ["TRT_INSTALL_HINT", "TORCH_TRT_INSTALL_HINT", "import_tensorrt", "import_torch_tensorrt", "trt_major"]

TRT_INSTALL_HINT = "install the trt extra (pip install 'edgekd[trt]') on a machine with an NVIDIA GPU and driver"
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
