"""``torch.library`` plumbing shared by the blocked shared-head backends: custom ops, fake kernels, autograd.

``define_shared_head_op(name, forward_impl, backward_impl)`` registers two opaque ops,

    edgekd::<name>(Tensor z_s, Tensor labels, Tensor? W_s, Tensor? b_s, Tensor z_st, Tensor? W_t, Tensor? b_t,
                   Tensor? z_t, int kind, float s, float m, float T, int terms, int block_c) -> (Tensor, Tensor)
    edgekd::<name>_bwd(Tensor grad, Tensor stats, <the same arguments>, int need) -> (Tensor, Tensor, Tensor, Tensor)

The forward returns ``losses: (4,)`` (ce, kd, th_ce, th_kd; zero where the ``terms`` bit is off) and
``stats: (B, 5)`` per-row log-sum-exps that the backward reuses. The backward returns ``dz_s, dz_st, dW_s, db_s``
(an empty tensor where the ``need`` bit or the input is absent), each term's gradient weighted by ``grad[k]``.
Fake kernels give the shapes, so a ``torch.compile(fullgraph=True)`` step traces through both without a graph
break; the backward is itself an op, so AOTAutograd sees it as one node too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

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
)

_ARGS = (
    "Tensor z_s, Tensor labels, Tensor? W_s, Tensor? b_s, Tensor z_st, Tensor? W_t, Tensor? b_t, Tensor? z_t, "
    "int kind, float s, float m, float T, int terms, int block_c"
)
FORWARD_SCHEMA = f"({_ARGS}) -> (Tensor, Tensor)"
BACKWARD_SCHEMA = f"(Tensor grad, Tensor stats, {_ARGS}, int need) -> (Tensor, Tensor, Tensor, Tensor)"

ForwardImpl = Callable[..., tuple[torch.Tensor, torch.Tensor]]
BackwardImpl = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def empty_grad(like: torch.Tensor | None, wanted: bool, device: torch.device) -> torch.Tensor:
    """``like``-shaped gradient buffer when wanted and present, else a 0-element placeholder."""
    if wanted and like is not None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    return torch.empty(0, device=device)


def outside_autocast(impl: Callable) -> Callable:
    """``impl`` run with autocast off on the device of its first tensor argument.

    An op body sees the caller's autocast state, also inside a compiled step (autocast is resolved when the graph is
    traced, but the opaque op runs under whatever state its caller has at run time). Under CUDA's bf16 autocast a
    ``torch.mm`` in a body would return bf16 logits. The ops define their own precision instead: operands in the
    dtype they are given (the head weights' dtype for the class matrices), float32 accumulation and statistics.
    """

    @functools.wraps(impl)
    def run(*args):
        with torch.autocast(args[0].device.type, enabled=False):
            return impl(*args)

    return run


def define_shared_head_op(name: str, forward_impl: ForwardImpl, backward_impl: BackwardImpl):
    """Register ``edgekd::<name>`` and ``edgekd::<name>_bwd`` with fake kernels and autograd; return the forward op.

    Both bodies run outside autocast (``outside_autocast``)."""
    fwd = torch.library.custom_op(
        f"edgekd::{name}", outside_autocast(forward_impl), mutates_args=(), schema=FORWARD_SCHEMA
    )
    bwd = torch.library.custom_op(
        f"edgekd::{name}_bwd", outside_autocast(backward_impl), mutates_args=(), schema=BACKWARD_SCHEMA
    )

    @fwd.register_fake
    def _(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, T, terms, block_c):
        acc = accum_dtype(z_s.dtype)
        return z_s.new_empty(4, dtype=acc), z_s.new_empty(z_s.shape[0], N_STATS, dtype=acc)

    @bwd.register_fake
    def _(grad, stats, z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, T, terms, block_c, need):
        return (
            empty_grad(z_s, bool(need & NEED_Z_S), z_s.device),
            empty_grad(z_st, bool(need & NEED_Z_ST), z_s.device),
            empty_grad(W_s, bool(need & NEED_W_S), z_s.device),
            empty_grad(b_s, bool(need & NEED_W_S), z_s.device),
        )

    def setup_context(ctx, inputs, output):
        z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, T, terms, block_c = inputs
        ctx.save_for_backward(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, output[1])
        ctx.scalars = (kind, s, m, T, terms, block_c)
        ctx.has_bias = b_s is not None

    def backward(ctx, grad_losses, grad_stats):
        z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, stats = ctx.saved_tensors
        kind, s, m, T, terms, block_c = ctx.scalars
        # Like autograd of the reference: no gradient for an input that no active term reads.
        student, th = bool(terms & (TERM_CE | TERM_KD)), bool(terms & (TERM_TH_CE | TERM_TH_KD))
        used = (student, False, student, student and kind == KIND_LINEAR, th)  # z_s, labels, W_s, b_s, z_st
        needs = [want and use for want, use in zip(ctx.needs_input_grad[:5], used, strict=True)]
        need = NEED_Z_S * needs[0] | NEED_Z_ST * needs[4] | NEED_W_S * (needs[2] or needs[3])
        if grad_losses is None:
            grad_losses = stats.new_zeros(4)
        dz_s, dz_st, dW_s, db_s = bwd(
            grad_losses.contiguous(), stats, z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, T, terms,
            block_c, need,
        )  # fmt: skip
        return (
            dz_s if needs[0] else None,
            None,
            dW_s if needs[2] else None,
            db_s if needs[3] else None,
            dz_st if needs[4] else None,
            *([None] * 9),
        )

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


def term_mask(weights) -> int:
    """The ``terms`` bits of the active head terms of a ``LossWeights``."""
    return sum(bit for bit, name in zip(TERM_BITS, HEAD_TERM_NAMES, strict=True) if getattr(weights, name))


def make_loss_backend(op, block_c: int = 0):
    """A ``LOSS_BACKENDS`` entry (the signature of ``shared_head_loss_reference``) that calls ``op``."""

    def backend(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, head, weights) -> dict[str, torch.Tensor]:
        terms = term_mask(weights)
        losses, _ = op(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, head.kind_id, float(head.s), float(head.m),
                       float(weights.T), terms, block_c)  # fmt: skip
        return {name: losses[k] for k, name in enumerate(HEAD_TERM_NAMES) if terms & TERM_BITS[k]}

    return backend
