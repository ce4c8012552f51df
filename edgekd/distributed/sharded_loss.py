"""The shared-head loss over a class-sharded head (Partial FC style): the ``edgekd::sharded_shared_head`` op.

Each of the ``W`` ranks of a process group holds ``B`` rows of the global batch (``N = W·B`` rows) and one class shard
of each head (``edgekd.distributed.shards``). No rank holds a full head or any ``(N, C)`` logits: the local shard is
swept in blocks of classes by a blocked backend's code (``sweep``): the chunked sweep (``edgekd.kernels.chunked``, any
device) or the fused Triton kernels (``edgekd.kernels.shared_head``); both write the same per-row partials.

Forward:
1. all_gather the rows ``[z_s | z_st | z_t]`` and the labels (every rank passes the same ``B``: gloo needs it);
2. the sweep's ``sweep_partials`` on the local shard, labels made local to it: per-row partials ``(N_PARTIALS, N)``
   (running max and sum of exp of every logit matrix, the KL sums, the target logit where the shard owns the label);
3. combine the partials across ranks (``union_partials``): an all_reduce MAX of the active log-sum-exps' maxima, then
   an all_reduce SUM of the sums rescaled to them, the KL sums and the target logits (at most 5 and 9 rows of N
   floats, whatever W; an all_gather of every rank's partials would move W·14·N) and ``merge_partials``: the losses
   of the global batch and its per-row log-sum-exps, the same on every rank (a reduction's result is).

Backward, analytic (autograd through collectives would differentiate the rank-sum of the replicated loss): every
logit's gradient needs only its row's global log-sum-exps, so the sweep's ``sweep_backward`` on the local shard gives
the shard's ``dW_s``/``db_s`` complete, with no communication, and its share of ``d loss / d rows`` ``(N, D)``; one
reduce-scatter sums the shares and hands each rank its ``B`` rows.

Gradient convention (Partial FC's): the returned terms are global-batch means, identical on every rank; ``dW_s`` and
``db_s`` are their exact gradient wrt the local shard; ``dz_s``/``dz_st`` are **W times** their exact gradient wrt this
rank's rows. A DDP backbone averages its gradient over the ranks, ``(1/W)·Σ_r J_rᵀ (W·g_r) = Σ_r J_rᵀ g_r``: exactly
the single-process gradient of the global-batch mean loss. A per-rank term such as ``l2e`` (a mean over the local
rows) needs no factor: DDP's average of local means is the global mean. Without DDP's averaging (e.g. a bare
backbone whose gradients are all-reduced with SUM), divide the row gradients by ``W``.

Every rank must make the same calls with the same ``requires_grad`` pattern (the backward's reduce-scatter is a
collective), and not under ``torch.inference_mode`` (gloo's all_gather refuses it; ``no_grad`` is fine).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from edgekd.distributed.shards import class_shard_of
from edgekd.errors import EdgekdError
from edgekd.heads.class_sampling import relabel
from edgekd.heads.margin import HeadSpec
from edgekd.kernels.shared_head_autograd import empty_grad, outside_autocast, term_mask
from edgekd.kernels.shared_head_math import (
    HEAD_TERM_NAMES,
    KIND_LINEAR,
    N_STATS,
    NEED_W_S,
    NEED_Z_S,
    NEED_Z_ST,
    TERM_BITS,
    TERM_CE,
    TERM_KD,
    TERM_TH_CE,
    TERM_TH_KD,
    accum_dtype,
    merge_partials,
    union_partials,
)
from edgekd.kernels.sweeps import SWEEPS

if TYPE_CHECKING:
    from edgekd.losses.terms import LossWeights

# The tensor forms of all_gather / reduce_scatter; the older names warn (FutureWarning) from torch 2.14.
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)

# z_st is optional: None means the th head reads z_s itself (the shared embedding), gathered and scattered once.
_ARGS = (
    "Tensor z_s, Tensor labels, Tensor? W_s, Tensor? b_s, Tensor? z_st, Tensor? W_t, Tensor? b_t, Tensor? z_t, "
    "Tensor? classes, int kind, float s, float m, float T, int terms, int block_c, int class_start, str group, "
    "str sweep"
)
_FORWARD_SCHEMA = f"({_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)"
_BACKWARD_SCHEMA = (
    "(Tensor grad, Tensor stats, Tensor rows, Tensor labels, Tensor? W_s, Tensor? b_s, Tensor? W_t, Tensor? b_t, "
    "int kind, float s, float m, float T, int terms, int block_c, str group, str sweep, int d_s, int d_st, "
    "int need) -> (Tensor, Tensor, Tensor, Tensor)"
)


def check_sharded_backend(backend: str) -> None:
    """Refuse, in one line, a ``--loss-backend`` that cannot run on a class shard: ``reference`` forms whole-head
    logits; ``auto`` and every sweep (``edgekd.kernels.sweeps``) can."""
    if backend not in ("auto", *SWEEPS):
        raise EdgekdError(
            f"--loss-backend {backend}: under torchrun the head is class-sharded and each rank sweeps its shard; "
            f"use --loss-backend auto, {' or '.join(SWEEPS)}"
        )


def _world(group: str) -> tuple[dist.ProcessGroup, int]:
    """The process group registered under ``group`` (``ProcessGroup.group_name``) and its size."""
    pg = _resolve_process_group(group)
    return pg, dist.get_world_size(pg)


def _gather(x: torch.Tensor, pg: dist.ProcessGroup, world: int, async_op: bool = False):
    """``(B, ...)`` from every rank -> ``(W·B, ...)`` in rank order, and the work handle when ``async_op``."""
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    return out, _all_gather(out, x.contiguous(), group=pg, async_op=async_op)


def global_labels(labels: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The global batch's labels: every rank's ``(B,)`` in rank order (a collective)."""
    return _gather(labels, group, dist.get_world_size(group))[0]


def _rows(z_s, z_st, z_t) -> torch.Tensor:
    """``[z_s | z_st | z_t]`` (absent parts left out) in their promoted dtype: one gather instead of three."""
    parts = [z.detach() for z in (z_s, z_st, z_t) if z is not None]
    dtype = functools.reduce(torch.promote_types, [z.dtype for z in parts])
    return torch.cat([z.to(dtype) for z in parts], 1)


def _split_rows(rows: torch.Tensor, d_s: int, d_st: int):
    """Views ``(z_s, z_st, z_t)`` of gathered rows; ``z_st`` is ``z_s`` when ``d_st == 0``, ``z_t`` None if absent."""
    z_s, z_st, z_t = rows.split([d_s, d_st, rows.shape[1] - d_s - d_st], 1)
    return z_s, (z_s if d_st == 0 else z_st), (z_t if z_t.shape[1] else None)


def _sharded_forward(
    z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, classes, kind, s, m, T, terms, block_c, class_start, group, sweep
):  # fmt: skip
    pg, world = _world(group)
    # Rows and labels travel together (two collectives in flight), the partials after the sweep.
    rows, rows_work = _gather(_rows(z_s, z_st, z_t), pg, world, async_op=True)
    labels_all, labels_work = _gather(labels, pg, world, async_op=True)
    rows_work.wait()
    labels_work.wait()
    zs_all, zst_all, zt_all = _split_rows(rows, z_s.shape[1], 0 if z_st is None else z_st.shape[1])
    local = shard_labels(labels_all, class_start, classes)
    part = SWEEPS[sweep].partials(zs_all, local, W_s, b_s, zst_all, W_t, b_t, zt_all, kind, s, m, T, terms,
                                         block_c)  # fmt: skip
    whole = union_partials(part[None], terms, _all_reduce(dist.ReduceOp.MAX, pg), _all_reduce(dist.ReduceOp.SUM, pg))
    losses, stats = merge_partials(whole[None], terms, T)
    return losses, stats, rows, local


def shard_labels(labels: torch.Tensor, class_start: int, classes: torch.Tensor | None) -> torch.Tensor:
    """Global class ids as rows of this rank's head tensors: the shard's rows, or the sampled ``classes`` of it.
    A label another rank owns (or a class not drawn) falls outside ``[0, rows)``, which the sweeps skip."""
    local = labels - class_start
    return local if classes is None else relabel(local, classes)


def _all_reduce(op: dist.ReduceOp, pg: dist.ProcessGroup):
    """``(1, k, N)`` of this rank -> ``(k, N)`` reduced over the ranks with ``op`` (``union_partials``' reductions)."""

    def reduce(x: torch.Tensor) -> torch.Tensor:
        out = x[0].contiguous()
        dist.all_reduce(out, op=op, group=pg)
        return out

    return reduce


def _sharded_backward(
    grad, stats, rows, local, W_s, b_s, W_t, b_t, kind, s, m, T, terms, block_c, group, sweep, d_s, d_st, need
):  # fmt: skip
    pg, world = _world(group)
    shared = d_st == 0
    zs_all, zst_all, zt_all = _split_rows(rows, d_s, d_st)
    sweep_need = need
    if shared and need & NEED_Z_S:
        sweep_need |= NEED_Z_ST  # the th head's path into the shared embedding
    dzs, dzst, dW_s, db_s = SWEEPS[sweep].backward(
        grad, stats, zs_all, local, W_s, b_s, zst_all, W_t, b_t, zt_all, kind, s, m, T, terms, block_c, sweep_need
    )
    if shared and dzs.numel():
        dzs, dzst = dzs + dzst, empty_grad(None, False, dzst.device)
    wanted = [dz for dz in (dzs, dzst) if dz.numel()]
    if wanted:
        # Sum every shard's share of d loss / d rows and keep this rank's B rows; ×W for DDP's average (module doc).
        # The sum runs in float32 at least: W bf16 shares would each be rounded again at every hop of the ring.
        full = torch.cat([dz.to(accum_dtype(dz.dtype)) for dz in wanted], 1)
        mine = full.new_empty(full.shape[0] // world, full.shape[1])
        _reduce_scatter(mine, full, op=dist.ReduceOp.SUM, group=pg)
        mine.mul_(world)
        parts = iter(part.contiguous() for part in mine.split([dz.shape[1] for dz in wanted], 1))  # no aliases
        dzs, dzst = (next(parts) if dz.numel() else dz for dz in (dzs, dzst))
    return dzs, dzst, dW_s, db_s


sharded_shared_head = torch.library.custom_op(
    "edgekd::sharded_shared_head", outside_autocast(_sharded_forward), mutates_args=(), schema=_FORWARD_SCHEMA
)
_sharded_shared_head_bwd = torch.library.custom_op(
    "edgekd::sharded_shared_head_bwd", outside_autocast(_sharded_backward), mutates_args=(), schema=_BACKWARD_SCHEMA
)


@sharded_shared_head.register_fake
def _(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, classes, kind, s, m, T, terms, block_c, class_start, group, sweep):
    N = _world(group)[1] * z_s.shape[0]
    rows = _rows(z_s, z_st, z_t)
    acc = accum_dtype(rows.dtype)  # the sweep runs on the gathered rows
    return (
        rows.new_empty(4, dtype=acc),
        rows.new_empty(N, N_STATS, dtype=acc),
        rows.new_empty(N, rows.shape[1]),
        (labels.new_empty(N)),
    )


@_sharded_shared_head_bwd.register_fake
def _(grad, stats, rows, labels, W_s, b_s, W_t, b_t, kind, s, m, T, terms, block_c, group, sweep, d_s, d_st,
      need):  # fmt: skip
    B = rows.shape[0] // _world(group)[1]
    device, acc = rows.device, accum_dtype(rows.dtype)  # the row gradients are summed over ranks in float32 at least
    return (
        rows.new_empty(B, d_s, dtype=acc) if need & NEED_Z_S else empty_grad(None, False, device),
        rows.new_empty(B, d_st, dtype=acc) if need & NEED_Z_ST and d_st else empty_grad(None, False, device),
        empty_grad(W_s, bool(need & NEED_W_S), device),
        empty_grad(b_s, bool(need & NEED_W_S), device),
    )


def _setup_context(ctx, inputs, output):
    z_s, _, W_s, b_s, z_st, W_t, b_t, _, _, kind, s, m, T, terms, block_c, _, group, sweep = inputs
    _, stats, rows, local = output
    ctx.save_for_backward(stats, rows, local, W_s, b_s, W_t, b_t)
    ctx.scalars = (kind, s, m, T, terms, block_c, group, sweep)
    ctx.widths = (z_s.shape[1], 0 if z_st is None else z_st.shape[1])
    ctx.dtypes = (z_s.dtype, None if z_st is None else z_st.dtype)


def _backward(ctx, grad_losses, grad_stats, grad_rows, grad_labels):
    stats, rows, local, W_s, b_s, W_t, b_t = ctx.saved_tensors
    kind, s, m, T, terms, block_c, group, sweep = ctx.scalars
    d_s, d_st = ctx.widths
    # Like autograd of the reference: no gradient for an input no active term reads (the th head reads z_s when
    # z_st is None). The need bits must agree on every rank: the reduce-scatter below them is a collective.
    student, th = bool(terms & (TERM_CE | TERM_KD)), bool(terms & (TERM_TH_CE | TERM_TH_KD))
    used = (student or (th and d_st == 0), student, student and kind == KIND_LINEAR, th and d_st > 0)
    wants = (ctx.needs_input_grad[i] for i in (0, 2, 3, 4))  # z_s, W_s, b_s, z_st
    needs = [want and use for want, use in zip(wants, used, strict=True)]
    need = NEED_Z_S * needs[0] | NEED_W_S * (needs[1] or needs[2]) | NEED_Z_ST * needs[3]
    if grad_losses is None:
        grad_losses = stats.new_zeros(4)
    dz_s, dz_st, dW_s, db_s = _sharded_shared_head_bwd(
        grad_losses.contiguous(), stats, rows, local, W_s, b_s, W_t, b_t, kind, s, m, T, terms, block_c, group, sweep,
        d_s, d_st, need,
    )  # fmt: skip
    return (
        dz_s.to(ctx.dtypes[0]) if needs[0] else None,
        None,
        dW_s if needs[1] else None,
        db_s if needs[2] else None,
        dz_st.to(ctx.dtypes[1]) if needs[3] else None,
        *([None] * 13),
    )


sharded_shared_head.register_autograd(_backward, setup_context=_setup_context)


def sharded_shared_head_loss(
    z_s: torch.Tensor,
    labels: torch.Tensor,
    W_s: torch.Tensor | None,
    b_s: torch.Tensor | None,
    z_st: torch.Tensor,
    W_t: torch.Tensor | None,
    b_t: torch.Tensor | None,
    z_t: torch.Tensor | None,
    head: HeadSpec,
    weights: LossWeights,
    *,
    group: dist.ProcessGroup,
    num_classes: int,
    block_c: int = 0,
    sweep: str = "chunked",
    rows: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The head terms (ce, kd, th_ce, th_kd) of the global batch, over class shards; a loss backend's signature.

    Args:
        z_s: (B, D_s) this rank's student rows; labels: (B,) their global class ids in ``[0, num_classes)``.
        W_s: (C_r, D_s) this rank's shard of the student head (``ClassShard.take``), b_s: (C_r,) its bias.
        z_st: (B, D_t) the rows the teacher head reads; pass ``z_s`` itself when they are the same embedding.
        W_t: (C_r, D_t) this rank's shard of the frozen teacher head, b_t: (C_r,) its bias; z_t: (B, D_t).
        head, weights: as ``shared_head_loss_reference``; only ``weights.T`` is read (one temperature per call).
        group: the ranks the head is split over, each passing the same ``B``.
        num_classes: C, the full head's classes, split in ``torch.chunk`` sizes (``class_shard_of``).
        block_c: classes per sweep block (0: the backend's default for the gathered rows).
        sweep: how each rank sweeps its shard, ``chunked`` (PyTorch, any device) or ``triton`` (the fused kernels:
            CUDA, or the CPU under ``TRITON_INTERPRET=1``; float32/float16/bfloat16).
        rows: Partial FC sampling: the sorted rows of this rank's shard that ``W_s``/``W_t`` hold (each rank draws
            its own, ``edgekd.heads.class_sampling``); labels stay global. None: the whole shard.

    Returns:
        Each active term, the same value on every rank. Gradients: module docstring (row gradients are ×W for DDP).
    """
    if sweep not in SWEEPS:
        raise EdgekdError(f"a class shard is swept by one of {', '.join(SWEEPS)}, not {sweep!r}")
    shard = class_shard_of(num_classes, group)
    expected = shard.size if rows is None else rows.numel()
    for name, w in (("W_s", W_s), ("W_t", W_t)):
        if w is not None and w.shape[0] != expected:
            raise EdgekdError(
                f"{name} has {w.shape[0]} rows but rank {dist.get_rank(group)} owns {shard.size} of {num_classes} "
                f"classes ([{shard.start}, {shard.stop})){'' if rows is None else f' and drew {expected}'}; pass "
                f"the shard, not the full head"
            )
    terms = term_mask(weights)
    th = terms & (TERM_TH_CE | TERM_TH_KD)
    z_st = None if z_st is z_s or not th else z_st
    z_t = z_t if terms & (TERM_KD | TERM_TH_KD) else None
    losses, _, _, _ = sharded_shared_head(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, rows, head.kind_id,
                                          float(head.s), float(head.m), float(weights.T), terms, block_c, shard.start,
                                          group.group_name, sweep)  # fmt: skip
    return {name: losses[k] for k, name in enumerate(HEAD_TERM_NAMES) if terms & TERM_BITS[k]}


def make_sharded_backend(group: dist.ProcessGroup, num_classes: int, block_c: int = 0, sweep: str = "chunked"):
    """``sharded_shared_head_loss`` bound to a group, head size and sweep: a ``LOSS_BACKENDS``-shaped function."""
    return functools.partial(
        sharded_shared_head_loss, group=group, num_classes=num_classes, block_c=block_c, sweep=sweep
    )
