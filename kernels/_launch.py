"""Launch rules for the shared-head Triton kernels: interpreter detection, block sizes, warps, grid splits.

All choices live here so the kernels and launchers stay free of device heuristics. The GPU numbers are
first guesses, not tuned (no GPU was available when they were written); ``TRITON_INTERPRET=1`` uses small
tiles so CPU tests cross many block boundaries quickly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgekd.kernels import interpreting


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes (rows, classes, reduction chunk), warps, pipeline stages and programs to aim for."""

    block_b: int
    block_c: int
    block_k: int
    num_warps: int
    num_stages: int
    target_programs: int


def sweep_config(kind: str, d_max: int, dtype: torch.dtype, device: torch.device, block_c: int = 0) -> LaunchConfig:
    """Config of one kernel: ``fwd`` (K-loop over D), ``dz`` or ``dw`` (full-D rows held in registers).

    GPU tiles were chosen by compiling each kernel for sm_90 and reading ptxas's register and spill report (no
    GPU at hand): they compile without spills, or with a few dozen bytes at D=512; speed is not tuned.

    Args:
        d_max: widest embedding the kernel holds (the full-D accumulators of ``dz``/``dw`` scale with it).
        block_c: classes per tile; 0 picks the default.
    """
    if interpreting():
        return LaunchConfig(16, block_c or 32, 32, 1, 1, 4)
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    if kind == "fwd":  # up to three [64, 64] fp32 logit tiles live at once
        return LaunchConfig(64, block_c or 64, 32, 8, 3, programs)
    d_pad, wide = next_pow2(d_max), dtype == torch.float32
    if d_pad <= 128 or (d_pad <= 256 and not wide):
        return LaunchConfig(64, block_c or 32, 32, 8, 3, programs)
    block_b = 16 if kind == "dw" and d_pad >= 512 and not wide else 32
    return LaunchConfig(block_b, block_c or 32, 32, 8, 2, programs)


def num_splits(n_row_blocks: int, n_class_blocks: int, target_programs: int) -> tuple[int, int]:
    """Split the class blocks into contiguous ranges so ``rows × splits`` reaches the program target.

    Returns ``(n_split, blocks_per_split)``; every split holds at least one class block.
    """
    want = max(1, -(-target_programs // max(1, n_row_blocks)))
    per = -(-n_class_blocks // min(want, n_class_blocks))
    return -(-n_class_blocks // per), per


def check_device(t: torch.Tensor) -> None:
    """The Triton backend runs on CUDA tensors, or on CPU tensors under the interpreter."""
    if t.device.type != "cuda" and not interpreting():
        from edgekd.errors import EdgekdError  # errors is below kernels in the import order

        raise EdgekdError(
            f"the triton loss backend needs CUDA tensors (got {t.device.type}); use backend='chunked' or set "
            "TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter"
        )
