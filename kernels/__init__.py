"""The shared-head loss as ``torch.library`` custom ops: fused Triton kernels and their PyTorch fallback.

Installed as edgekd.kernels. ``edgekd.kernels.chunked`` registers ``edgekd::shared_head_chunked`` (pure PyTorch,
any device); ``edgekd.kernels.shared_head_op`` registers ``edgekd::shared_head_triton``, and Triton is imported at
its first call. Importing this package imports neither. ``edgekd.kernels.sweeps`` lists both (the one registry of
blocked backends, for one process and for class shards); ``edgekd.losses`` registers them as loss backends. Nothing here
imports ``edgekd.losses``, and the margin and its epsilons come from ``edgekd.heads.margin``. ``shared_head_math``
(per-row partials and their merge) and ``shared_head_autograd`` (the custom-op plumbing) are public to the packages
that build on the sweeps (``edgekd.distributed``).
"""

import importlib.util
import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def is_available() -> bool:
    """True when Triton is installed and can run here: a CUDA GPU, or ``TRITON_INTERPRET=1`` on the CPU."""
    if importlib.util.find_spec("triton") is None:
        return False
    import torch  # late: `import edgekd.kernels` stays cheap (the package doc)

    return torch.cuda.is_available() or interpreting()
