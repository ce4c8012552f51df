"""Per-row and per-class math shared by the chunked and Triton shared-head backends (pure PyTorch, O(B·D + C)).

Both blocked backends sweep the classes and never hold a ``(B, C)`` matrix. What they need besides the sweep
lives here: the per-row target logit with its margin (computed once by gathering ``W[labels]``, so the sweep only
substitutes it at the target column), the margin's derivative, the backward of row normalization, and the
merge of the per-row partials of disjoint class ranges (kernel splits, chunked blocks, ranks' shards).

The margin formula, its epsilons and the head kinds come from ``edgekd.heads.margin``, the one definition that
the reference loss differentiates; ``edgekd.kernels`` imports nothing from ``edgekd.losses``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgekd.heads.margin import HEAD_KINDS, NORM_EPS, margin_phi

# The ops take the head kind as an int: its index in HEAD_KINDS (``HeadSpec.kind_id``).
KIND_LINEAR = HEAD_KINDS.index("linear")

# Bits of the ``terms`` argument of the custom ops and indices of their (4,) loss output.
TERM_CE, TERM_KD, TERM_TH_CE, TERM_TH_KD = 1, 2, 4, 8
TERM_BITS = (TERM_CE, TERM_KD, TERM_TH_CE, TERM_TH_KD)
HEAD_TERM_NAMES = ("ce", "kd", "th_ce", "th_kd")

# Columns of the (B, 5) per-row statistics the forward saves for the backward.
LSE_CE_S, LSE_KD_S, LSE_T, LSE_CE_TH, LSE_KD_TH = range(5)
N_STATS = 5

# Bits of the ``need`` argument of the backward ops.
NEED_Z_S, NEED_Z_ST, NEED_W_S = 1, 2, 4


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_norms(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N,) L2 norms of the rows of x: (N, D), accumulated in ``dtype``."""
    return torch.linalg.vector_norm(x, dim=1, dtype=dtype)


def inv_clamped(norms: torch.Tensor) -> torch.Tensor:
    """``1 / max(norm, NORM_EPS)``: the scale that normalizes a row (the F.normalize convention)."""
    return 1.0 / norms.clamp_min(NORM_EPS)


def normalize_backward(grad: torch.Tensor, x_hat: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Gradient wrt x of ``x̂ = x / max(‖x‖, eps)`` given ``grad`` wrt x̂; all (N, D) with norms (N,).

    ``(g − (g·x̂) x̂) / ‖x‖`` where the norm is not clamped, ``g / eps`` where it is (the norm then is a constant).
    """
    proj = grad - (grad * x_hat).sum(1, keepdim=True) * x_hat
    return torch.where((norms >= NORM_EPS)[:, None], proj, grad) * inv_clamped(norms)[:, None]


@dataclass
class HeadRows:
    """One head applied to one embedding, prepared for a class sweep.

    Attributes:
        e: (B, D) embedding as the sweep multiplies it: normalized for cosine heads, in ``dot_dtype``.
        e_norms: (B,) row norms of the raw embedding (normalized heads; None for linear).
        t_ce: (B,) accumulation-dtype logit of each row's target class with the margin (the CE target logit).
        dphi: (B,) derivative of the margin at the target cosine (1 without margin).
    """

    e: torch.Tensor
    e_norms: torch.Tensor | None
    t_ce: torch.Tensor | None
    dphi: torch.Tensor | None


def prepare_rows(
    z: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None,
    labels: torch.Tensor | None,
    kind: int,
    s: float,
    m: float,
    dot_dtype: torch.dtype,
    acc: torch.dtype,
) -> HeadRows:
    """Embedding and per-row target values for head ``W: (C, D)`` (bias ``b: (C,)``) on ``z: (B, D)``.

    ``labels=None`` skips the target (teacher logits need none). The target cosine is computed from the same
    ``dot_dtype`` embedding and weight values the sweep multiplies, so the substituted target matches the sweep.
    """
    if kind == KIND_LINEAR:
        e, e_norms = z.to(dot_dtype), None
    else:
        e_norms = row_norms(z, acc)
        e = (z.to(acc) * inv_clamped(e_norms)[:, None]).to(dot_dtype)
    if labels is None:
        return HeadRows(e, e_norms, None, None)
    w_y = W[labels].to(acc)  # (B, D)
    dot = (e.to(acc) * w_y).sum(1)
    if kind == KIND_LINEAR:
        t_ce = dot if b is None else dot + b[labels].to(acc)
        return HeadRows(e, None, t_ce, torch.ones_like(t_ce))
    cos = dot * inv_clamped(row_norms(w_y, acc))
    phi, dphi = margin_phi(cos, HEAD_KINDS[kind], m)
    return HeadRows(e, e_norms, s * phi, dphi)


def prepare_range_rows(z, W, b, labels, kind, s, m, dot_dtype, acc) -> HeadRows:
    """``prepare_rows`` for labels that may fall outside ``W``'s classes (one class range, labels local to it).

    Such rows have no target in this range: their target logit is 0 (the range holding the label supplies it in
    ``combine_partials``) and their margin derivative 1; the sweeps never substitute it, since no column of the
    range equals their label. The gather is clamped.
    """
    if labels is None:
        return prepare_rows(z, W, b, None, kind, s, m, dot_dtype, acc)
    owned = (labels >= 0) & (labels < W.shape[0])
    rows = prepare_rows(z, W, b, labels.clamp(0, W.shape[0] - 1), kind, s, m, dot_dtype, acc)
    rows.t_ce = torch.where(owned, rows.t_ce, 0.0)
    rows.dphi = torch.where(owned, rows.dphi, 1.0)
    return rows


# Rows of the per-row partials of a sweep over a class range, ``(N_PARTIALS, B)``: ``(max, Σ exp(x − max))`` pairs at
# P and P + 1 for each log-sum-exp, the KL sums ``Σ exp(a − max_a)(a − b)`` of kd and th_kd (at the teacher's max
# P_T), and each row's CE target logit with its margin (0 where the range does not hold the label). Both blocked
# backends write this layout, so partials of any class ranges (kernel splits, chunked blocks, ranks) merge alike.
P_CE_S, P_KD_S, P_T, P_K_S, P_K_TH, P_CE_TH, P_KD_TH, P_TGT_S, P_TGT_TH = 0, 2, 4, 6, 7, 8, 10, 12, 13
N_PARTIALS = 14


def _lse_rows(terms: int) -> tuple[tuple[int, int], ...]:
    """``(partials row, used)`` of each log-sum-exp, in the column order of the stats (``LSE_CE_S`` ...)."""
    return (
        (P_CE_S, terms & TERM_CE),
        (P_KD_S, terms & TERM_KD),
        (P_T, terms & (TERM_KD | TERM_TH_KD)),
        (P_CE_TH, terms & TERM_TH_CE),
        (P_KD_TH, terms & TERM_TH_KD),
    )


def union_partials(part: torch.Tensor, terms: int, reduce_max, reduce_sum) -> torch.Tensor:
    """The partials ``(N_PARTIALS, B)`` of the union of disjoint class ranges from theirs, ``(n, N_PARTIALS, B)``.

    The maxima of the active log-sum-exps are combined first; then every range's sums are rescaled to them (the KL
    sums follow the teacher's max) and added, with each row's target logit (the range holding its label has it, the
    others 0). ``reduce_max`` and ``reduce_sum`` take ``(n, k, B)`` to ``(k, B)`` over the ranges: over dim 0 when
    all ranges are here (``combine_partials``), or an all_reduce across processes that hold one each (the class-sharded
    loss: two reductions of at most 5 and 9 rows of B, whatever the number of processes). Rows of inactive terms are
    left as the first range has them (their max is −inf). With one range every factor is ``exp(0) = 1``: exact.
    """
    lse = [row for row, used in _lse_rows(terms) if used]
    out = part[0].clone()
    out[lse] = reduce_max(part[:, lse])
    sums, rows = [], []
    for row in lse:
        sums.append(part[:, row + 1] * torch.exp(part[:, row] - out[row]))
        rows.append(row + 1)
    if terms & (TERM_KD | TERM_TH_KD):
        rescale = torch.exp(part[:, P_T] - out[P_T])  # (n, B): each range's teacher max to the union's
        for row, bit in ((P_K_S, TERM_KD), (P_K_TH, TERM_TH_KD)):
            if terms & bit:
                sums.append(part[:, row] * rescale)
                rows.append(row)
    for row, bit in ((P_TGT_S, TERM_CE), (P_TGT_TH, TERM_TH_CE)):
        if terms & bit:
            sums.append(part[:, row])
            rows.append(row)
    out[rows] = reduce_sum(torch.stack(sums, 1))
    return out


def combine_partials(part: torch.Tensor, terms: int) -> torch.Tensor:
    """``union_partials`` of ranges all held here, ``(n, N_PARTIALS, B)``."""
    return union_partials(part, terms, lambda x: x.max(0).values, lambda x: x.sum(0))


def merge_partials(part: torch.Tensor, terms: int, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(losses (4,), stats (B, 5))`` from the partials ``(n, N_PARTIALS, B)`` of disjoint ranges covering the head.

    ``losses`` are the means over the B rows of ce, kd, th_ce, th_kd (0 where inactive), ``stats`` each row's
    log-sum-exps (0 where unused), which the backward sweeps reuse.
    """
    one = part[0] if part.shape[0] == 1 else combine_partials(part, terms)  # one range: already combined
    zeros = one.new_zeros(one.shape[1])
    stats = torch.stack([one[row] + torch.log(one[row + 1]) if used else zeros for row, used in _lse_rows(terms)], 1)
    losses = one.new_zeros(4)
    if terms & TERM_CE:
        losses[0] = (stats[:, LSE_CE_S] - one[P_TGT_S]).mean()
    if terms & TERM_TH_CE:
        losses[2] = (stats[:, LSE_CE_TH] - one[P_TGT_TH]).mean()
    for k, bit, col, row in ((1, TERM_KD, LSE_KD_S, P_K_S), (3, TERM_TH_KD, LSE_KD_TH, P_K_TH)):
        if terms & bit:
            losses[k] = T * T * kl_rows(one[row], one[P_T + 1], stats[:, LSE_T], stats[:, col]).mean()
    return losses, stats


def kl_rows(k_sum: torch.Tensor, s_t: torch.Tensor, lse_t: torch.Tensor, lse_x: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(p_t ‖ p_x)`` from ``k_sum = Σ_j exp(a_j − M)(a_j − b_j)`` and ``s_t = Σ_j exp(a_j − M)``, (B,).

    a = teacher logits / T with log-sum-exp ``lse_t``, b = the other logits / T with log-sum-exp ``lse_x``.
    """
    return k_sum / s_t - (lse_t - lse_x)
