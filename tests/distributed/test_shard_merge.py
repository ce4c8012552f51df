"""The sharded loss's math in one process: partials of disjoint class ranges merge into the whole head's loss.

What every rank of ``edgekd::sharded_shared_head`` computes, without a process group (fast; the 2-rank gloo test is
marked slow): C = 11 classes cut into three uneven ranges (4/4/3), each swept with labels local to it
(``sweep_partials``), merged (``merge_partials``), then ``sweep_backward`` per range with the merged statistics.
The losses and stats equal the chunked op's on the whole head, the ranges' ``dW_s``/``db_s`` concatenate to its
``dW_s``/``db_s`` and their ``dz`` sum to its ``dz`` (float64, rtol 1e-11, atol 1e-12). The Triton sweep's partials
(float32, Triton's CPU interpreter) merge the same way, to rtol 1e-4, atol 1e-5 of the float64 whole head.
"""

from __future__ import annotations

import pytest
import torch

from edgekd.heads import HEAD_KINDS, HeadSpec, default_margin
from edgekd.kernels.chunked import shared_head_chunked, sweep_backward
from edgekd.kernels.shared_head_math import NEED_W_S, NEED_Z_S, NEED_Z_ST, merge_partials
from edgekd.kernels.sweeps import SWEEPS, Sweep

C, B, D_S, D_T = 11, 7, 6, 5
RANGES = ((0, 4), (4, 8), (8, 11))
# float64 (u = 1.1e-16): partials of 3 ranges merged against one sweep, other orders of sums over C = 11 logits of size
# ≤ s = 64: ≲ C·u·s ≈ 8e-14; 1e-12 absolute and 1e-11 relative.
TOL = {"rtol": 1e-11, "atol": 1e-12}
# The Triton sweep in float32 (u = 2⁻²⁴) against the float64 whole head: logits s·cos with D ≤ 6 terms round by
# ≲ s·D·u ≈ 2e-5 at worst, √D times less typically; 1e-4 relative, 1e-5 absolute.
TOL_FP32 = {"rtol": 1e-4, "atol": 1e-5}


def _sweep(name: str) -> Sweep:
    sweep = SWEEPS[name]
    if sweep.requires:
        pytest.importorskip(sweep.requires, reason=f"the {name} sweep needs the {sweep.requires} package")
    return sweep


@pytest.mark.parametrize("sweep", list(SWEEPS))
@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_partials_of_class_ranges_merge_to_the_whole_head(kind, sweep):
    g = torch.Generator().manual_seed(0)
    shapes = {"z_s": (B, D_S), "W_s": (C, D_S), "b_s": (C,), "z_st": (B, D_T), "W_t": (C, D_T), "b_t": (C,)}
    x = {k: torch.randn(*shape, generator=g, dtype=torch.float64) for k, shape in (shapes | {"z_t": (B, D_T)}).items()}
    z_s, W_s, b_s, z_st, W_t, b_t, z_t = x.values()
    labels = torch.tensor([0, 3, 4, 7, 8, 10, 5])  # every range holds a label, on and next to its edges
    head = HeadSpec(kind, 1.0 if kind == "linear" else 64.0, default_margin(kind))
    scalars = (head.kind_id, float(head.s), float(head.m), 2.0, 15, 2)  # kind, s, m, T, all four terms, block_c 2
    grad = torch.tensor([1.0, 0.7, 0.3, 0.2], dtype=torch.float64)
    need = NEED_Z_S | NEED_Z_ST | NEED_W_S
    args = (z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t)

    whole_losses, whole_stats = shared_head_chunked(*args, *scalars)
    whole_grads = sweep_backward(grad, whole_stats, *args, *scalars, need)

    module, dtype, tol = _sweep(sweep), torch.float64, TOL
    if module.requires == "triton":
        dtype, tol = torch.float32, TOL_FP32

    def shard(c0, c1):
        cut = (z_s, W_s[c0:c1], b_s[c0:c1], z_st, W_t[c0:c1], b_t[c0:c1], z_t)
        z, W, b, zst, Wt, bt, zt = (x.to(dtype) for x in cut)
        return (z, labels - c0, W, b, zst, Wt, bt, zt)

    def close(got, want):
        torch.testing.assert_close(got.double(), want, **tol)

    parts = torch.stack([module.partials(*shard(c0, c1), *scalars) for c0, c1 in RANGES])
    losses, stats = merge_partials(parts, 15, 2.0)
    close(losses, whole_losses)
    close(stats, whole_stats)
    grads = [module.backward(grad.to(dtype), stats, *shard(c0, c1), *scalars, need) for c0, c1 in RANGES]
    dz_s, dz_st, dW_s, db_s = whole_grads
    close(sum(g[0] for g in grads), dz_s)
    close(sum(g[1] for g in grads), dz_st)
    close(torch.cat([g[2] for g in grads]), dW_s)
    close(torch.cat([g[3] for g in grads]), db_s)
