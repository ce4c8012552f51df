"""The loss terms of classifier-sharing KD as plain formulas (SPEC §3).

Notation: a student embedding ``z_s: (B, D_s)``, a teacher embedding ``z_t: (B, D_t)``, class matrices
``W: (C, D)`` and, for linear heads, biases ``b: (C,)``. Every backend (reference, chunked, triton) must
agree with these formulas; tests compare them against float64.

Face heads are normalized cosine heads: ``logits = s * cos(z, W_c)`` with a margin on the target class
(ArcFace ``cos(θ + m)`` with the classic fallback ``cos θ − m·sin m`` once ``θ + m > π``, CosFace
``cos θ − m``). The margin is applied to CE terms only, never to logits that feed a KL term.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from edgekd.errors import EdgekdError

HEAD_KINDS = ("linear", "cosine", "arcface", "cosface")
TERM_NAMES = ("ce", "kd", "th_ce", "th_kd", "l2e")

# 1 - cos² is clamped below by this before the square root, so the ArcFace gradient stays finite at θ = 0.
SIN2_EPS = 1e-12
# Row norms are clamped below by this before dividing (the F.normalize convention).
NORM_EPS = 1e-12


@dataclass(frozen=True)
class HeadSpec:
    """How class logits are formed from an embedding.

    Args:
        kind: ``linear`` (``z W^T + b``), ``cosine`` (``s·cos``, no margin), ``arcface`` or ``cosface``.
        s: scale of normalized heads (ignored for ``linear``).
        m: margin (ArcFace: angle in radians; CosFace: cosine offset); ``cosine`` and ``linear`` use 0.
    """

    kind: str = "arcface"
    s: float = 64.0
    m: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise EdgekdError(f"unknown head kind {self.kind!r}; choose one of {', '.join(HEAD_KINDS)}")
        if self.kind in ("arcface", "cosface") and not 0.0 <= self.m < math.pi / 2:
            raise EdgekdError(f"margin m={self.m} is out of range for {self.kind}; use 0 <= m < pi/2")

    @property
    def normalized(self) -> bool:
        return self.kind != "linear"

    @property
    def kind_id(self) -> int:
        """Integer code of ``kind`` (its index in ``HEAD_KINDS``), for kernels and custom ops."""
        return HEAD_KINDS.index(self.kind)


@dataclass(frozen=True)
class LossWeights:
    """Weights of the five terms and the KD temperature. A zero weight means the term is not computed."""

    ce: float = 1.0
    kd: float = 0.0
    th_ce: float = 0.0
    th_kd: float = 0.0
    l2e: float = 0.0
    T: float = 4.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not math.isfinite(value) or value < 0:
                raise EdgekdError(f"loss weight {name}={value} must be a finite number >= 0")
        if self.T <= 0:
            raise EdgekdError(f"temperature T={self.T} must be > 0")

    def active(self) -> tuple[str, ...]:
        """Names of the terms with a non-zero weight, in ``TERM_NAMES`` order."""
        return tuple(name for name in TERM_NAMES if getattr(self, name) != 0)


def l2_normalize(z: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm, clamped below by ``NORM_EPS``."""
    return z / z.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def plain_logits(z: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, head: HeadSpec) -> torch.Tensor:
    """Logits without margin, ``(B, C)``: ``z W^T + b`` for linear heads, ``s·cos(z, W)`` otherwise."""
    if head.normalized:
        return head.s * (l2_normalize(z) @ l2_normalize(W).T)
    logits = z @ W.T
    return logits if b is None else logits + b


def margin_target(cos: torch.Tensor, head: HeadSpec) -> torch.Tensor:
    """The target-class cosine after the margin: ArcFace ``cos(θ+m)`` (fallback past π), CosFace ``cos − m``."""
    if head.kind == "arcface":
        sin = torch.sqrt((1.0 - cos * cos).clamp_min(SIN2_EPS))
        phi = cos * math.cos(head.m) - sin * math.sin(head.m)
        # θ + m > π  ⇔  cos θ < cos(π − m): cos(θ+m) stops decreasing there, so use the linear fallback.
        return torch.where(cos > math.cos(math.pi - head.m), phi, cos - head.m * math.sin(head.m))
    if head.kind == "cosface":
        return cos - head.m
    return cos


def margin_logits(
    z: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, labels: torch.Tensor, head: HeadSpec
) -> torch.Tensor:
    """Logits for CE, ``(B, C)``: plain logits with the margin applied to each row's target class."""
    if head.kind not in ("arcface", "cosface"):
        return plain_logits(z, W, b, head)
    cos = l2_normalize(z) @ l2_normalize(W).T
    target = cos.gather(1, labels[:, None])
    cos = cos.scatter(1, labels[:, None], margin_target(target, head))
    return head.s * cos


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``logsumexp(logits) − logits[label]``."""
    return (torch.logsumexp(logits, dim=1) - logits.gather(1, labels[:, None]).squeeze(1)).mean()


def kl_distill(teacher_logits: torch.Tensor, student_logits: torch.Tensor, T: float) -> torch.Tensor:
    """``T² · mean_b KL(softmax(l_t/T) ‖ softmax(l_s/T))`` (Hinton KD; the teacher side carries no gradient)."""
    log_p_t = torch.log_softmax(teacher_logits.detach() / T, dim=1)
    log_p_s = torch.log_softmax(student_logits / T, dim=1)
    return T * T * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


def l2_embedding(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """``mean_b ‖ẑ_s − ẑ_t‖²`` on L2-normalized embeddings (the paper's L2E baseline)."""
    return (l2_normalize(z_s) - l2_normalize(z_t.detach())).pow(2).sum(dim=1).mean()
