"""The sharded loss's math in one process: partials of disjoint class ranges merge into the whole head's loss.

What every rank of ``edgekd::sharded_shared_head`` computes, without a process group (fast; the 2-rank gloo test is
marked slow): C = 11 classes cut into three uneven ranges (4/4/3), each swept with labels local to it
(``sweep_partials``), merged (``merge_partials``), then ``sweep_backward`` per range with the merged statistics.
The losses and stats equal the chunked op's on the whole head, the ranges' ``dW_s``/``db_s`` concatenate to its
``dW_s``/``db_s`` and their ``dz`` sum to its ``dz`` (float64, rtol 1e-11, atol 1e-12).
"""

from __future__ import annotations

import pytest
import torch

from edgekd.heads import HEAD_KINDS, HeadSpec, default_margin
from edgekd.kernels._shared_head_math import NEED_W_S, NEED_Z_S, NEED_Z_ST
from edgekd.kernels.chunked import merge_partials, shared_head_chunked, sweep_backward, sweep_partials

C, B, D_S, D_T = 11, 7, 6, 5
RANGES = ((0, 4), (4, 8), (8, 11))
TOL = {"rtol": 1e-11, "atol": 1e-12}


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_partials_of_class_ranges_merge_to_the_whole_head(kind):
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

    def shard(c0, c1):
        return (z_s, labels - c0, W_s[c0:c1], b_s[c0:c1], z_st, W_t[c0:c1], b_t[c0:c1], z_t)

    parts = torch.stack([sweep_partials(*shard(c0, c1), *scalars) for c0, c1 in RANGES])
    losses, stats = merge_partials(parts, 15, 2.0)
    torch.testing.assert_close(losses, whole_losses, **TOL)
    torch.testing.assert_close(stats, whole_stats, **TOL)
    grads = [sweep_backward(grad, stats, *shard(c0, c1), *scalars, need) for c0, c1 in RANGES]
    dz_s, dz_st, dW_s, db_s = whole_grads
    torch.testing.assert_close(sum(g[0] for g in grads), dz_s, **TOL)
    torch.testing.assert_close(sum(g[1] for g in grads), dz_st, **TOL)
    torch.testing.assert_close(torch.cat([g[2] for g in grads]), dW_s, **TOL)
    torch.testing.assert_close(torch.cat([g[3] for g in grads]), db_s, **TOL)
