"""One rank's rows of a class head, as it trains them, and the gradient clip over replicated and sharded parameters.

A ``HeadShard`` owns classes ``[start, stop)`` of a ``ClassHead`` (``edgekd.distributed.shards``): its ``weight``
(and the linear head's ``bias``) are Parameters of their own, trainable or frozen as the full head's were, so the
optimizer's state (SGD momentum) and weight decay act on the shard alone; elementwise, they give what one process
gives on those rows. ``gather_into`` writes every rank's rows into rank 0's full head (the final bundle);
``clip_grad_norm_`` clips with the norm of the whole model's gradient, as ``torch.nn.utils.clip_grad_norm_`` does
in one process.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from edgekd.distributed.shards import ClassShard, class_shard_of
from edgekd.heads import ClassHead

_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)

# Rows of each shard per all_gather when the trained head is gathered: 2^16 rows of D = 512 fp32 is 128 MiB per rank.
GATHER_ROWS = 1 << 16


class HeadShard(nn.Module):
    """Rows ``shard`` of ``head``, copied; trainable where the head is. ``weight: (C_r, D)``, ``bias: (C_r,)``.

    A head on the meta device (a fresh one, ``build_trainee`` under torchrun, or a teacher's loaded lazily) gives
    only this rank's rows (``ClassHead.rows``): its initial values, or those of its file.
    """

    def __init__(self, head: ClassHead, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.spec, self.group = head.spec, group
        self.shard: ClassShard = class_shard_of(head.num_classes, group)
        weight, bias = head.rows(self.shard.start, self.shard.stop)
        self.weight = nn.Parameter(weight, head.weight.requires_grad)
        self.bias = nn.Parameter(bias, head.bias.requires_grad) if bias is not None else None

    @property
    def num_classes(self) -> int:
        """C of the full head."""
        return self.shard.num_classes

    def gather_on_main(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The full ``(C, ...)`` tensor from every rank's ``(C_r, ...)`` shard of it, in rank 0's host memory (None
        on the other ranks), gathered ``GATHER_ROWS`` rows of each shard at a time: no device holds more than
        ``W · GATHER_ROWS`` rows of it (a collective, so every rank calls it)."""
        world, main = dist.get_world_size(self.group), dist.get_rank(self.group) == 0
        per_rank = math.ceil(self.num_classes / world)  # torch.chunk sizes: only the last shard may be shorter
        tail = tensor.shape[1:]
        full = torch.empty((world, per_rank, *tail), dtype=tensor.dtype) if main else None
        for r0 in range(0, per_rank, GATHER_ROWS):
            r1 = min(r0 + GATHER_ROWS, per_rank)
            piece = tensor.new_zeros((r1 - r0, *tail))
            mine = tensor[r0:r1]
            piece[: mine.shape[0]] = mine
            out = tensor.new_empty((world * (r1 - r0), *tail))
            _all_gather(out, piece, group=self.group)
            if main:
                full[:, r0:r1] = out.view(world, r1 - r0, *tail).cpu()
        return full.view(world * per_rank, *tail)[: self.num_classes] if main else None

    @torch.no_grad()
    def gather_into(self, head: ClassHead) -> None:
        """Make every rank's rows the parameters of ``head`` (the full head this shard was cut from) on rank 0, in
        host memory; the other ranks' ``head`` is left as it is (the final bundle is rank 0's to write).

        New Parameters (trainable as before) replace the head's, which may be placeholders (``release``).
        """
        for name in ("weight", "bias"):
            if getattr(self, name) is not None:
                full = self.gather_on_main(getattr(self, name).detach())
                if full is not None:
                    setattr(head, name, nn.Parameter(full, requires_grad=getattr(head, name).requires_grad))


def release(head: ClassHead) -> None:
    """Free ``head``'s memory while its shards train: its Parameters become placeholders of the same shape and
    trainability on the meta device (no storage); ``HeadShard.gather_into`` gives rank 0's real ones back."""
    for name in ("weight", "bias"):
        p = getattr(head, name)
        if p is not None:
            setattr(head, name, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))


def clip_grad_norm_(
    replicated: Iterable[nn.Parameter], sharded: Iterable[nn.Parameter], max_norm: float, group: dist.ProcessGroup
) -> torch.Tensor:
    """Clip every gradient by the norm of all of them together; returns that norm (the same on every rank).

    Args:
        replicated: parameters whose gradients are the same on every rank (a DDP backbone's, after backward).
        sharded: parameters each rank holds a different part of (head shards); their squared norms are summed over
            ``group``.
    """
    replicated, sharded = list(replicated), list(sharded)
    device = (replicated + sharded)[0].device
    norm_of = lambda ps: torch.nn.utils.get_total_norm([p.grad for p in ps if p.grad is not None])  # noqa: E731
    local = norm_of(sharded).to(device).square()  # a frozen head shard has none: 0
    dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
    total = (norm_of(replicated).to(device).square() + local).sqrt()
    torch.nn.utils.clip_grads_with_norm_(replicated + sharded, max_norm, total)
    return total
