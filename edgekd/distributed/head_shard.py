"""One rank's rows of a class head, as it trains them, and the gradient clip over replicated and sharded parameters.

A ``HeadShard`` owns classes ``[start, stop)`` of a ``ClassHead`` (``edgekd.distributed.shards``): its ``weight``
(and the linear head's ``bias``) are Parameters of their own, trainable or frozen as the full head's were, so the
optimizer's state (SGD momentum) and weight decay act on the shard alone; elementwise, they give what one process
gives on those rows. ``gather_into`` writes every rank's rows back into a full head (the final bundle);
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
        self.weight = nn.Parameter(weight.clone(), head.weight.requires_grad)
        self.bias = nn.Parameter(bias.clone(), head.bias.requires_grad) if bias is not None else None

    @property
    def num_classes(self) -> int:
        """C of the full head."""
        return self.shard.num_classes

    def gather_full(self, tensor: torch.Tensor) -> torch.Tensor:
        """The full ``(C, ...)`` tensor from every rank's ``(C_r, ...)`` shard of it, on every rank."""
        world = dist.get_world_size(self.group)
        per_rank = math.ceil(self.num_classes / world)  # torch.chunk sizes: only the last shard may be shorter
        padded = tensor.new_zeros((per_rank, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        out = tensor.new_empty((world * per_rank, *tensor.shape[1:]))
        _all_gather(out, padded, group=self.group)
        return out[: self.num_classes]

    @torch.no_grad()
    def gather_into(self, head: ClassHead) -> None:
        """Make every rank's rows the parameters of ``head`` (the full head this shard was cut from), on every rank.

        New Parameters (trainable as before) replace the head's, which may be placeholders (``release``).
        """
        for name in ("weight", "bias"):
            if getattr(self, name) is not None:
                full = self.gather_full(getattr(self, name).detach())
                setattr(head, name, nn.Parameter(full, requires_grad=getattr(head, name).requires_grad))


def release(head: ClassHead) -> None:
    """Free ``head``'s memory while its shards train: its Parameters become placeholders of the same shape and
    trainability on the meta device (no storage); ``HeadShard.gather_into`` gives it real ones back."""
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
