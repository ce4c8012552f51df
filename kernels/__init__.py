"""Fused Triton kernels for the shared-head loss and their torch.library custom op (installed as edgekd.kernels).

Importing this package imports neither Triton nor the kernels: ``edgekd.kernels.shared_head_op`` registers the
``edgekd::shared_head_triton`` op (and the ``triton`` loss backend), and Triton is imported at its first call.
"""

import importlib.util


def is_available() -> bool:
    """True when Triton is installed and can run here: a CUDA GPU, or ``TRITON_INTERPRET=1`` on the CPU."""
    if importlib.util.find_spec("triton") is None:
        return False
    import torch

    from edgekd.kernels._launch import interpreting

    return torch.cuda.is_available() or interpreting()
