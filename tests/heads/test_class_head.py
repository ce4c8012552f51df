"""``ClassHead``'s initialization: block-seeded rows, so a class shard computes its own rows without the others."""

from __future__ import annotations

import math

import pytest
import torch

from edgekd.heads import create_head
from edgekd.heads.class_head import INIT_BLOCK_ROWS, initial_rows
from edgekd.heads.margin import HeadSpec

R = INIT_BLOCK_ROWS


@pytest.mark.parametrize("kind", ["arcface", "linear"])
def test_any_range_of_rows_is_the_same_rows_of_the_whole_head(kind):
    spec, C, seed = HeadSpec(kind, 64.0, 0.0), 2 * R + 37, 12345
    whole = initial_rows(spec, 3, 0, C, seed)
    for start, stop in ((0, 1), (R - 1, R + 1), (R + 5, 2 * R + 37), (1, C), (2 * R, 2 * R + 1)):
        assert torch.equal(initial_rows(spec, 3, start, stop, seed), whole[start:stop]), (start, stop)
    assert not torch.equal(initial_rows(spec, 3, 0, C, seed + 1), whole)


def test_initial_values_follow_arcface_torch_and_nn_linear():
    """Normalized heads: N(0, 0.01) (arcface_torch's class centres); linear: U(±1/√D) (nn.Linear's default)."""
    D, C = 64, 3 * R
    normal = initial_rows(HeadSpec("cosface", 64.0, 0.4), D, 0, C, seed=1)
    assert abs(normal.mean().item()) < 1e-4 and normal.std().item() == pytest.approx(0.01, rel=0.01)
    uniform = initial_rows(HeadSpec("linear", 1.0, 0.0), D, 0, C, seed=1)
    bound = 1 / math.sqrt(D)
    assert uniform.abs().max().item() <= bound and uniform.abs().max().item() > 0.999 * bound
    assert uniform.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)  # the std of U(−b, b)


def test_a_head_is_seeded_by_torchs_global_generator_and_meta_heads_hold_no_storage():
    torch.manual_seed(3)
    head = create_head("linear", 4, 10)
    torch.manual_seed(3)
    again = create_head("linear", 4, 10)
    torch.manual_seed(3)
    lazy = create_head("linear", 4, 10, device="meta")
    assert torch.equal(head.weight, again.weight) and torch.equal(head.bias, torch.zeros(10))
    assert lazy.weight.is_meta and lazy.bias.is_meta and lazy.init_seed == head.init_seed
    assert torch.equal(initial_rows(lazy.spec, 4, 0, 10, lazy.init_seed), head.weight)
