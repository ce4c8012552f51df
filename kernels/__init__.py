"""The shared-head loss as ``torch.library`` custom ops: fused Triton kernels and their PyTorch fallback.

Installed as edgekd.kernels. ``edgekd.kernels.chunked`` registers ``edgekd::shared_head_chunked`` (pure PyTorch,
any device); ``edgekd.kernels.shared_head_op`` registers ``edgekd::shared_head_triton``, and Triton is imported at
its first call. Importing this package imports neither. The loss registry (``edgekd.losses``) registers both as
backends; nothing here imports ``edgekd.losses``, and the margin and its epsilons come from ``edgekd.heads.margin``.
"""

import importlib.util


def is_available() -> bool:
    """True when Triton is installed and can run here: a CUDA GPU, or ``TRITON_INTERPRET=1`` on the CPU."""
    if importlib.util.find_spec("triton") is None:
        return False
    import torch  # late: `import edgekd.kernels` stays cheap and Triton-free (the package doc)

    from edgekd.kernels._launch import interpreting  # late: _launch imports Triton, which may be absent

    return torch.cuda.is_available() or interpreting()
