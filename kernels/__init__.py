"""Fused Triton kernels for the shared-head loss and their torch.library custom op (installed as edgekd.kernels)."""
