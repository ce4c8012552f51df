"""The ``reference`` backend: materializes every ``(B, C)`` logit matrix and lets autograd differentiate.

It is the definition of the loss (works in float64) and the oracle that the chunked and Triton backends
are tested against. Memory is O(B·C): use it for small heads only.
"""

from __future__ import annotations

import torch

from edgekd.heads.margin import HeadSpec, margin_logits, plain_logits
from edgekd.losses.terms import LossWeights, cross_entropy, kl_distill


def shared_head_loss_reference(
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
) -> dict[str, torch.Tensor]:
    """The head terms (ce, kd, th_ce, th_kd) by direct formula; see ``shared_head_loss`` for the arguments.

    Like every backend it forms both KL terms at ``weights.T``; ``shared_head_loss`` gives th_kd its own ``T_th``
    by calling the backend once per temperature (``backend_calls``).
    """
    # The teacher side is frozen by definition: no gradient reaches W_t, b_t or z_t even if they require one.
    W_t, b_t, z_t = (t.detach() if t is not None else None for t in (W_t, b_t, z_t))
    terms: dict[str, torch.Tensor] = {}
    teacher_logits = None
    if weights.kd or weights.th_kd:
        with torch.no_grad():
            teacher_logits = plain_logits(z_t, W_t, b_t, head)
    if weights.ce:
        terms["ce"] = cross_entropy(margin_logits(z_s, W_s, b_s, labels, head), labels)
    if weights.kd:
        terms["kd"] = kl_distill(teacher_logits, plain_logits(z_s, W_s, b_s, head), weights.T)
    if weights.th_ce:
        terms["th_ce"] = cross_entropy(margin_logits(z_st, W_t, b_t, labels, head), labels)
    if weights.th_kd:
        terms["th_kd"] = kl_distill(teacher_logits, plain_logits(z_st, W_t, b_t, head), weights.T)
    return terms
