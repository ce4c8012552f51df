"""Batch norm over the global batch on any device (gloo on the CPU too): a multi-rank run normalizes as one process.

With data parallelism each rank sees ``B = N / W`` rows. Plain BatchNorm would normalize them with their own batch
statistics, so the model a W-rank run trains would depend on W. ``SyncBatchNorm`` here combines every rank's
per-channel mean and sum of squared deviations (Chan's parallel formula: one all_gather of ``(2, C)`` float64
numbers per layer) into the statistics of all ``N`` rows, normalizes with them and updates the running statistics as
a single process with batch ``N`` would (unbiased variance). torch's own ``nn.SyncBatchNorm`` runs only on GPUs;
this one is plain tensor math around one custom op, ``edgekd::global_batch_stats``, whose analytic backward
all_reduces the ``(2, C)`` gradient of the global statistics (the same size whatever W) and maps it to each rank's
own statistics, so autograd differentiates the global statistics, and a compiled step has no graph break.

Gradient convention: as the sharded head's (``edgekd.distributed.sharded_loss``). Every rank's loss gradient wrt its
rows is W times the global loss's and DDP averages parameter gradients; the summed backward keeps that exact.

``convert_sync_batchnorm`` swaps the layers of a model in place for ones that share their parameters and buffers
(the state_dict keys and tensors stay the same); ``restore`` puts the original layers back. timm's ``BatchNormAct2d``
(a ``BatchNorm2d`` that also applies dropout and an activation) keeps both after the synchronized normalization.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.nn.modules.batchnorm import _BatchNorm

from edgekd.errors import EdgekdError

_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def _world_size(group: str) -> int:
    return dist.get_world_size(_resolve_process_group(group))


@torch.library.custom_op("edgekd::global_batch_stats", mutates_args=())
def global_batch_stats(stats: torch.Tensor, count: int, group: str) -> torch.Tensor:
    """``(2, C)`` mean and sum of squared deviations of this rank's ``count`` rows per channel -> ``(2, C)`` mean and
    biased variance of every rank's rows (each rank has ``count``): Chan's parallel formula over one all_gather."""
    pg = _resolve_process_group(group)
    world = dist.get_world_size(pg)
    every = stats.new_empty((world * 2, *stats.shape[1:]))  # the tensor form stacks along dim 0
    _all_gather(every, stats.contiguous(), group=pg)
    means, m2s = every.view(world, 2, -1).unbind(1)
    mean = means.mean(0)
    var = (m2s.sum(0) + count * (means - mean).square().sum(0)) / (world * count)
    return torch.stack([mean, var])


@global_batch_stats.register_fake
def _(stats, count, group):
    return torch.empty_like(stats)


@torch.library.custom_op("edgekd::global_batch_stats_grad", mutates_args=())
def global_batch_stats_grad(grad: torch.Tensor, stats: torch.Tensor, mean: torch.Tensor, count: int, group: str
                            ) -> torch.Tensor:  # fmt: skip
    """This rank's ``(2, C)`` gradient of its ``stats`` from every rank's ``grad`` of the global ``(mean, var)``.

    Every rank's loss reads the same global statistics, so the summed gradient ``G`` of all ranks' losses (one
    all_reduce of ``(2, C)``, whatever W) is what reaches each rank's statistics: with ``n = count`` rows per rank and
    ``N = W·n``, ``∂mean/∂mean_r = 1/W``, ``∂var/∂mean_r = 2n(mean_r − mean)/N`` (the mean's own path cancels, since
    the ``mean_r − mean`` sum to 0) and ``∂var/∂M2_r = 1/N``.
    """
    pg = _resolve_process_group(group)
    world = dist.get_world_size(pg)
    total = grad.contiguous().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=pg)
    g_mean, g_var = total
    N = world * count
    return torch.stack([g_mean / world + g_var * (2 * count / N) * (stats[0] - mean), g_var / N])


@global_batch_stats_grad.register_fake
def _(grad, stats, mean, count, group):
    return torch.empty_like(stats)


def _backward(ctx, grad):
    stats, out = ctx.saved_tensors
    return global_batch_stats_grad(grad, stats, out[0], ctx.count, ctx.group), None, None


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output)
    ctx.count, ctx.group = inputs[1], inputs[2]


global_batch_stats.register_autograd(_backward, setup_context=_setup_context)


class SyncBatchNorm(nn.Module):
    """A BatchNorm layer normalizing with the statistics of the rows of every rank of ``group``.

    Args:
        bn: the layer it replaces; its parameters and buffers are shared, not copied.
        group: ``ProcessGroup.group_name`` of the data-parallel ranks (each with the same batch size).
    """

    def __init__(self, bn: _BatchNorm, group: str) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.track_running_stats, self.group = bn.track_running_stats, group
        self.world_size = _world_size(group)  # here, not in forward: Dynamo cannot trace the group's lookup
        self.weight, self.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name))
        # What the layer applies after normalizing, under the layer's own names (its state_dict keys stay the same).
        after = _after_norm(bn)
        for name, module in after:
            self.add_module(name, module)
        self.after = tuple(name for name, _ in after)
        self.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._normalize(x)
        for name in self.after:
            y = getattr(self, name)(y)
        return y

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.running_mean is not None:
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        # Training, or evaluating a layer without running statistics: the global batch's statistics (as BatchNorm
        # uses its batch's), updating the running ones only when training.
        shape = (1, -1) + (1,) * (x.ndim - 2)
        dims = [0, *range(2, x.ndim)]
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in float32 at least
        n = xf.numel() // xf.shape[1]
        # Sums of deviations from a shift near the mean (any constant is exact; no gradient goes through it), then
        # the per-rank mean and sum of squared deviations in float64: the ranks' means differ by ~std/sqrt(n), and
        # their float32 rounding (~1e-7 of |mean|) would enter the combined variance in that difference.
        shift = xf.mean(dims).detach()
        d = xf - shift.view(shape)
        s1, s2 = d.sum(dims).double(), d.square().sum(dims).double()
        mean_r, m2_r = shift.double() + s1 / n, s2 - s1.square() / n
        mean, var = global_batch_stats(torch.stack([mean_r, m2_r]), n, self.group)  # float64; var biased
        total = self.world_size * n
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (total / max(total - 1, 1))
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        y = (xf - mean.to(xf.dtype).view(shape)) * torch.rsqrt(var + self.eps).to(xf.dtype).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def _after_norm(bn: _BatchNorm) -> list[tuple[str, nn.Module]]:
    """The modules a BatchNorm layer applies to its normalized output, in order: none for torch's layers, ``drop``
    then ``act`` for timm's ``BatchNormAct2d`` (its forward is BatchNorm's followed by those two). A subclass with
    any other forward of its own cannot be synchronized without changing what it computes: refused in one line."""
    cls = type(bn)
    if cls.forward is _BatchNorm.forward:  # torch's BatchNorm1d/2d/3d and subclasses that keep their forward
        return []
    if isinstance(getattr(bn, "drop", None), nn.Module) and isinstance(getattr(bn, "act", None), nn.Module):
        return [("drop", bn.drop), ("act", bn.act)]
    raise EdgekdError(
        f"{cls.__module__}.{cls.__name__} is a BatchNorm layer with a forward of its own, which edgekd cannot "
        "synchronize across ranks; train this model in one process (without --nproc / torchrun)"
    )


def convert_sync_batchnorm(module: nn.Module, group: dist.ProcessGroup) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every BatchNorm layer under ``module`` by a ``SyncBatchNorm`` over ``group``, in place.

    Returns:
        ``(parent, name, original layer)`` for ``restore``.
    """
    swapped = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                setattr(parent, name, SyncBatchNorm(child, group.group_name))
                swapped.append((parent, name, child))
    return swapped


def restore(swapped: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Put back the layers ``convert_sync_batchnorm`` replaced (they hold the trained values already)."""
    for parent, name, original in reversed(swapped):
        original.train(getattr(parent, name).training)
        setattr(parent, name, original)
