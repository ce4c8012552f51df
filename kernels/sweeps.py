"""The registry of class sweeps: every blocked shared-head backend, one entry each, for one process and for shards.

A sweep computes the shared-head loss over a range of classes in blocks, never holding a ``(B, C)`` matrix. Its
module provides ``sweep_partials`` (per-row partials ``(N_PARTIALS, B)`` of a class range, ``shared_head_math``'s
layout) and ``sweep_backward`` (that range's gradients from the merged per-row statistics), and a loss backend with
the signature of ``shared_head_loss_reference`` over the whole head (a custom op made by ``define_shared_head_op``).
``edgekd.losses`` lists every sweep here as a loss backend, and the class-sharded op (``edgekd.distributed``) runs any
of them on a rank's shard: an entry added here works in one process and under torchrun alike.

Modules are imported on first use: the Triton sweep's imports Triton, an optional dependency (``requires``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sweep:
    """A blocked backend. ``sweep_module`` defines ``sweep_partials`` and ``sweep_backward``; ``op_module`` defines
    the loss backend ``loss_name``; ``requires`` is the optional package they need (None: torch alone)."""

    name: str
    sweep_module: str
    op_module: str
    loss_name: str
    requires: str | None = None

    def partials(self, *args) -> torch.Tensor:
        """``sweep_partials(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, T, terms, block_c)``."""
        return importlib.import_module(self.sweep_module).sweep_partials(*args)

    def backward(self, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``sweep_backward(grad, stats, <the partials' arguments>, need) -> (dz_s, dz_st, dW_s, db_s)``."""
        return importlib.import_module(self.sweep_module).sweep_backward(*args)

    def loss_backend(self):
        """The whole-head loss backend (imports its module; ImportError where ``requires`` is missing)."""
        return getattr(importlib.import_module(self.op_module), self.loss_name)


SWEEPS: dict[str, Sweep] = {
    sweep.name: sweep
    for sweep in (
        Sweep("chunked", "edgekd.kernels.chunked", "edgekd.kernels.chunked", "shared_head_loss_chunked"),
        Sweep(
            "triton",
            "edgekd.kernels.shared_head",
            "edgekd.kernels.shared_head_op",
            "shared_head_loss_triton",
            requires="triton",
        ),  # fmt: skip
    )
}


def list_sweeps() -> list[str]:
    """Every sweep's name, those whose optional package is missing included."""
    return list(SWEEPS)
