"""Class shards: the split of ``torch.chunk`` and DTensor's ``Shard(0)``, and the error when a rank would own none."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor.placement_types import Shard

from edgekd.distributed import ClassShard, class_shard
from edgekd.errors import EdgekdError


def test_shards_follow_torch_chunk_and_dtensor_shard0():
    """Every (C ≤ 40, W ≤ 8) that torch.chunk splits into W non-empty chunks, and two heads of Partial FC size."""
    splits = [(C, W) for C in range(1, 41) for W in range(1, 9) if len(torch.arange(C).chunk(W)) == W]
    for C, W in [*splits, (2_000_000, 8), (2_000_001, 8)]:
        shards = [class_shard(C, rank, W) for rank in range(W)]
        assert [s.start for s in shards] == [sum(s.size for s in shards[:rank]) for rank in range(W)], (C, W)
        assert shards[-1].stop == C and all(s.num_classes == C for s in shards), (C, W)
        if C <= 40:
            assert [s.size for s in shards] == [len(c) for c in torch.arange(C).chunk(W)], (C, W)
        dtensor = [Shard.local_shard_size_and_offset(C, W, rank) for rank in range(W)]
        assert [(s.size, s.start) for s in shards] == dtensor, (C, W)


def test_take_slices_the_rank_rows():
    full = torch.arange(11 * 3).view(11, 3)
    assert torch.equal(class_shard(11, 0, 2).take(full), full[:6])
    assert torch.equal(class_shard(11, 1, 2).take(full), full[6:])
    assert class_shard(11, 1, 2) == ClassShard(6, 11, 11)
    with pytest.raises(EdgekdError, match="10 classes"):
        class_shard(11, 1, 2).take(full[:10])


@pytest.mark.parametrize("C,W", [(1, 2), (3, 4), (5, 4), (0, 1)])
def test_a_rank_without_classes_is_refused(C, W):
    """W > C, and the splits where torch.chunk itself leaves a rank empty (5 classes in 4: 2, 2, 1, 0)."""
    with pytest.raises(EdgekdError, match="non-empty shards"):
        class_shard(C, 0, W)


def test_rank_outside_the_world_is_refused():
    with pytest.raises(EdgekdError, match="rank 2"):
        class_shard(11, 2, 2)
