"""How a class head forms logits from an embedding: ``HeadSpec``, the ArcFace / CosFace margins and their epsilons.

Notation: an embedding ``z: (B, D)``, a class matrix ``W: (C, D)`` and, for linear heads, a bias ``b: (C,)``.
Face heads are normalized cosine heads: ``logits = s * cos(z, W_c)`` with a margin on the target class
(ArcFace ``cos(θ + m)`` with the classic fallback ``cos θ − m·sin m`` once ``θ + m > π``, CosFace
``cos θ − m``). The margin is applied to CE logits only, never to logits that feed a KL term (SPEC §3).

This module is the one definition: the reference loss (``edgekd.losses``) differentiates these formulas with
autograd, and the blocked backends (``edgekd.kernels``) take the epsilons and ``margin_phi`` (the margin with its
derivative) from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgekd.errors import EdgekdError

HEAD_KINDS = ("linear", "cosine", "arcface", "cosface")

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


def l2_normalize(z: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm, clamped below by ``NORM_EPS``."""
    return z / z.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def plain_logits(z: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, head: HeadSpec) -> torch.Tensor:
    """Logits without margin, ``(B, C)``: ``z W^T + b`` for linear heads, ``s·cos(z, W)`` otherwise."""
    if head.normalized:
        return head.s * (l2_normalize(z) @ l2_normalize(W).T)
    logits = z @ W.T
    return logits if b is None else logits + b


def margin_phi(cos: torch.Tensor, kind: str, m: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The target cosine after the margin, ``φ(cos)``, and its derivative ``dφ/dcos``, both shaped like ``cos``.

    ``φ`` is what autograd differentiates in the reference loss; ``dφ/dcos`` equals that autograd (a test checks
    it) and lets the blocked backends chain the CE gradient at the target column without autograd.
    """
    one = torch.ones_like(cos)
    if kind == "arcface":
        sin2 = 1.0 - cos * cos
        sin = torch.sqrt(sin2.clamp_min(SIN2_EPS))
        phi = cos * math.cos(m) - sin * math.sin(m)
        # d sin / d cos = −cos / sin where the clamp is inactive (clamp_min passes the gradient where sin2 ≥ eps).
        dphi = math.cos(m) + torch.where(sin2 >= SIN2_EPS, cos / sin, torch.zeros_like(cos)) * math.sin(m)
        # θ + m > π  ⇔  cos θ < cos(π − m): cos(θ+m) stops decreasing there, so use the linear fallback.
        keep = cos > math.cos(math.pi - m)
        return torch.where(keep, phi, cos - m * math.sin(m)), torch.where(keep, dphi, one)
    if kind == "cosface":
        return cos - m, one
    return cos, one


def margin_target(cos: torch.Tensor, head: HeadSpec) -> torch.Tensor:
    """The target-class cosine after the margin: ArcFace ``cos(θ+m)`` (fallback past π), CosFace ``cos − m``."""
    return margin_phi(cos, head.kind, head.m)[0]


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
