"""Partial FC sampling (``--sample-rate``): the draw, and the loss over the drawn classes.

The draw is checked against its definition (every positive, ``⌈r·C⌉`` classes in all, sorted, a pure function of
seed, step and shard; negatives uniform: a binomial bound over many steps). The sampled loss is checked against the
float64 reference evaluated on the drawn rows of the heads, built by hand (labels mapped with a dict), for the
reference and chunked backends, with the heads' gradient zero on the rows not drawn.
"""

from __future__ import annotations

import math

import pytest
import torch

from edgekd.heads import HeadSpec
from edgekd.heads.class_sampling import ClassSampler, relabel
from edgekd.losses import LossWeights, shared_head_loss
from edgekd.losses.reference import shared_head_loss_reference

C, B, D = 50, 8, 6
LABELS = torch.tensor([3, 3, 17, 40, 49, 0, 17, 22])


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.95])
def test_draw_keeps_every_positive_and_the_count(rate):
    rows = ClassSampler(rate, seed=7).rows(5, LABELS, 0, C)
    positives = set(LABELS.tolist())
    assert rows.dtype == torch.int64 and rows.tolist() == sorted(set(rows.tolist()))  # sorted, no repeats
    assert positives <= set(rows.tolist())
    assert rows.numel() == max(math.ceil(rate * C), len(positives))
    assert 0 <= rows.min() and rows.max() < C


def test_draw_of_a_shard_keeps_the_positives_it_owns():
    start, size = 20, 30  # classes [20, 50): owns 22, 40, 49 of LABELS
    rows = ClassSampler(0.2, seed=0).rows(0, LABELS, start, size)
    assert {2, 20, 29} <= set(rows.tolist()) and rows.numel() == 6 and rows.max() < size


def test_draw_is_a_function_of_seed_step_and_shard():
    sampler = ClassSampler(0.3, seed=1)
    first = sampler.rows(11, LABELS, 0, C)
    assert torch.equal(first, ClassSampler(0.3, seed=1).rows(11, LABELS, 0, C))  # a resumed run draws the same
    assert not torch.equal(first, sampler.rows(12, LABELS, 0, C))
    assert not torch.equal(first, ClassSampler(0.3, seed=2).rows(11, LABELS, 0, C))
    # Another shard whose positives sit at the same local rows: its own draw.
    assert not torch.equal(first, sampler.rows(11, LABELS + 100, 100, C))


def test_rate_one_or_a_full_draw_samples_nothing():
    assert ClassSampler(1.0, seed=0).rows(0, LABELS, 0, C) is None
    assert ClassSampler(0.9, seed=0).rows(0, torch.tensor([0, 1]), 0, 3) is None  # ⌈2.7⌉ = 3: every class


def test_negatives_are_uniform():
    """Over 2,000 steps each of the 43 negative classes is drawn with probability (15 − 7) / 43: every count lies
    within 5 binomial standard deviations of its mean (a fixed seed: the test is deterministic)."""
    sampler, steps = ClassSampler(0.3, seed=3), 2000
    counts = torch.zeros(C)
    for step in range(steps):
        counts[sampler.rows(step, LABELS, 0, C)] += 1
    positives = sorted(set(LABELS.tolist()))
    assert (counts[positives] == steps).all()
    p = (math.ceil(0.3 * C) - len(positives)) / (C - len(positives))
    negatives = counts[[c for c in range(C) if c not in positives]]
    mean, sd = steps * p, math.sqrt(steps * p * (1 - p))
    assert ((negatives - mean).abs() < 5 * sd).all(), negatives


def test_relabel_maps_to_positions_and_misses_to_minus_one():
    rows = torch.tensor([1, 4, 9, 12])
    labels = torch.tensor([4, 12, 1, 9, 0, 5, 13])
    position = {c: i for i, c in enumerate(rows.tolist())}
    assert relabel(labels, rows).tolist() == [position.get(c, -1) for c in labels.tolist()]


def _case(kind: str):
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    linear = kind == "linear"
    head = HeadSpec(kind, 1.0 if linear else 16.0, 0.5 if kind == "arcface" else 0.0)
    leaves = {"z_s": rand(B, D), "W_s": rand(C, D), "W_t": rand(C, D), "z_t": rand(B, D)}
    if linear:
        leaves |= {"b_s": rand(C), "b_t": rand(C)}
    for k in ("z_s", "W_s", "b_s"):
        if k in leaves:
            leaves[k].requires_grad_()
    return head, leaves


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("kind", ["arcface", "linear"])
def test_sampled_loss_is_the_loss_over_the_drawn_classes(backend, kind):
    weights = LossWeights(ce=1.0, kd=0.7, th_ce=0.3, th_kd=0.2, T=2.0, T_th=2.0)
    rows = ClassSampler(0.3, seed=5).rows(2, LABELS, 0, C)
    head, leaves = _case(kind)
    total, _ = shared_head_loss(
        leaves["z_s"], LABELS, W_s=leaves["W_s"], b_s=leaves.get("b_s"), W_t=leaves["W_t"], b_t=leaves.get("b_t"),
        z_t=leaves["z_t"], head=head, weights=weights, backend=backend, rows=rows,
    )  # fmt: skip
    total.backward()

    # The same loss built by hand: the heads' drawn rows, labels as positions among them.
    _, ref = _case(kind)
    kept = rows.tolist()
    position = torch.tensor([kept.index(c) for c in LABELS.tolist()])
    sub = {k: ref[k][rows] if k in ("W_s", "W_t", "b_s", "b_t") else ref[k] for k in ref}
    terms = shared_head_loss_reference(sub["z_s"], position, sub["W_s"], sub.get("b_s"), sub["z_s"], sub["W_t"],
                                       sub.get("b_t"), sub["z_t"], head, weights)  # fmt: skip
    ref_total = sum(getattr(weights, k) * v for k, v in terms.items())
    ref_total.backward()

    tol = {"rtol": 1e-10, "atol": 1e-12}  # float64 sums over ≤ 15 logits of size ≤ 16 in another order
    torch.testing.assert_close(total, ref_total, **tol)
    for k in ("z_s", "W_s", "b_s"):
        if k in leaves:
            torch.testing.assert_close(leaves[k].grad, ref[k].grad, **tol)
    not_drawn = torch.ones(C, dtype=torch.bool)
    not_drawn[rows] = False
    assert (leaves["W_s"].grad[not_drawn] == 0).all()


def test_rate_one_is_the_exact_loss():
    weights = LossWeights(ce=1.0, kd=0.5)
    head, leaves = _case("arcface")
    args = dict(W_s=leaves["W_s"], W_t=leaves["W_t"], z_t=leaves["z_t"], head=head, weights=weights, backend="chunked")
    full, _ = shared_head_loss(leaves["z_s"], LABELS, **args)
    drawn, _ = shared_head_loss(leaves["z_s"], LABELS, rows=ClassSampler(1.0, 0).rows(0, LABELS, 0, C), **args)
    assert torch.equal(full, drawn)
