"""bench/collective_bytes.py counts the collectives a real 2- and 4-rank step issues (gloo, CPU): the loss's traffic
is what its design says, O(N) per rank for the statistics, and the W = 64 row extrapolates as counted worlds do."""

from __future__ import annotations

import argparse

import pytest

from bench import collective_bytes as cb

ARGS = argparse.Namespace(model="mbf_tiny", dim=16, batch=4, image_size=32)


@pytest.mark.slow  # 2 + 4 spawned ranks, 4 steps each: ~40 s on a loaded 2-core CPU
def test_counted_collectives_match_the_design_and_extrapolate():
    two, four = cb.count(ARGS, 2), cb.count(ARGS, 4)
    B, D = ARGS.batch, ARGS.dim
    for world, counted in ((2, two), (4, four)):
        N = world * B
        loss = sorted((op, n) for component, op, n in counted["th-kd"] if component == "loss")
        # rows [z_s | z_t] (the teacher head reads z_s itself) and labels; 5 maxima then 5 sums + 2 KL sums + 2
        # targets, float32 rows of N; the row gradient's reduce-scatter, float32 N x D. Nothing of size W·14·N.
        assert loss == sorted([("all_gather", B * 2 * D * 4), ("all_gather", B * 8), ("all_reduce", 5 * N * 4),
                               ("all_reduce", 9 * N * 4), ("reduce_scatter", N * D * 4)])  # fmt: skip
        vanilla = sorted((op, n) for component, op, n in counted["vanilla"] if component == "loss")
        assert vanilla == sorted([("all_gather", B * D * 4), ("all_gather", B * 8), ("all_reduce", 1 * N * 4),
                                  ("all_reduce", 2 * N * 4), ("reduce_scatter", N * D * 4)])  # fmt: skip
        ddp = sum(n for component, _, n in counted["vanilla"] if component == "DDP gradients")
        params = sum(p.numel() for p in cb.create_model("mbf_tiny", input_size=32, embed_dim=D).parameters())
        assert ddp == params * 4
    for method in cb.WEIGHTS:
        assert sorted(cb.scaled(two[method], 2, 4)) == sorted(four[method])
