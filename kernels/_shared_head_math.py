"""Per-row and per-class math shared by the chunked and Triton shared-head backends (pure PyTorch, O(B·D + C)).

Both blocked backends sweep the classes and never hold a ``(B, C)`` matrix. What they need besides the sweep
lives here: the per-row target logit with its margin (computed once by gathering ``W[labels]``, so the sweep only
substitutes it at the target column), the margin's derivative, the backward of row normalization, and the
merge of per-split online log-sum-exp partials.

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


def merge_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """log-sum-exp of per-split partials ``(max, Σ exp(x − max))``, each (n_split, B) -> (B,)."""
    mx = m.max(0).values
    return mx + torch.log((s * torch.exp(m - mx)).sum(0))


def kl_rows(k_sum: torch.Tensor, s_t: torch.Tensor, lse_t: torch.Tensor, lse_x: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(p_t ‖ p_x)`` from ``k_sum = Σ_j exp(a_j − M)(a_j − b_j)`` and ``s_t = Σ_j exp(a_j − M)``, (B,).

    a = teacher logits / T with log-sum-exp ``lse_t``, b = the other logits / T with log-sum-exp ``lse_x``.
    """
    return k_sum / s_t - (lse_t - lse_x)
