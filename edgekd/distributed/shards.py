"""Which classes of a ``(C, D)`` head a rank owns: contiguous ranges in ``torch.chunk`` sizes.

Rank ``r`` of ``W`` owns ``[r·k, min((r + 1)·k, C))`` with ``k = ceil(C / W)``: the split of ``torch.chunk`` and of
DTensor's ``Shard(0)`` placement, so a shard can be wrapped as a DTensor (checkpoints) without moving rows. Partial
FC's split (``C // W`` plus one for the first ``C % W`` ranks) differs when ``W`` does not divide ``C``: its offsets do
not describe a ``Shard(0)`` tensor. Every shard must hold at least one class (a rank with none would send empty
tensors, which gloo's all_gather does not survive), so ``C`` classes allow at most the ``W`` with
``(W − 1)·ceil(C / W) < C``: every ``W ≤ C`` but the few where ``torch.chunk`` itself returns fewer than ``W`` chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from edgekd.errors import EdgekdError


@dataclass(frozen=True)
class ClassShard:
    """Classes ``[start, stop)`` of ``num_classes``: one rank's rows of the head."""

    start: int
    stop: int
    num_classes: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """The shard's rows of a full ``(C, ...)`` head or bias: a view, so clone it to own the memory."""
        if full.shape[0] != self.num_classes:
            raise EdgekdError(f"a head with {full.shape[0]} classes cannot be sliced as one of {self.num_classes}")
        return full[self.start : self.stop]


def class_shard(num_classes: int, rank: int, world_size: int) -> ClassShard:
    """Rank ``rank``'s classes out of ``num_classes`` split ``world_size`` ways in ``torch.chunk`` sizes.

    Raises:
        EdgekdError: when some rank would own no class (``world_size > num_classes``, or a split ``torch.chunk``
            leaves short, such as 5 classes in 4).
    """
    if not 0 <= rank < world_size:
        raise EdgekdError(f"rank {rank} is not in a world of {world_size}")
    per_rank = math.ceil(num_classes / world_size) if num_classes > 0 else 0
    if num_classes <= 0 or (world_size - 1) * per_rank >= num_classes:
        raise EdgekdError(
            f"{num_classes} classes cannot be split into {world_size} non-empty shards of torch.chunk sizes "
            f"(ceil(C/W) = {per_rank} each); use fewer ranks for the head"
        )
    return ClassShard(rank * per_rank, min((rank + 1) * per_rank, num_classes), num_classes)


def class_shard_of(num_classes: int, group: dist.ProcessGroup) -> ClassShard:
    """This process's shard in ``group``."""
    return class_shard(num_classes, dist.get_rank(group), dist.get_world_size(group))
