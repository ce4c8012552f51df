"""The loss terms of classifier-sharing KD as plain formulas (SPEC §3).

Notation: a student embedding ``z_s: (B, D_s)``, a teacher embedding ``z_t: (B, D_t)``, logits ``(B, C)``.
How a head forms logits (linear, cosine, the ArcFace / CosFace margins) is ``edgekd.heads.margin``. Every
backend (reference, chunked, triton) must agree with these formulas; tests compare them against float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from edgekd.errors import EdgekdError
from edgekd.heads.margin import l2_normalize

TERM_NAMES = ("ce", "kd", "th_ce", "th_kd", "l2e")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the five terms and the two KL temperatures. A zero weight means the term is not computed.

    ``T`` is kd's temperature and ``T_th`` th_kd's: the official code sets them apart (``--kd_T``, ``--kdth_t``),
    both 4 by default.
    """

    ce: float = 1.0
    kd: float = 0.0
    th_ce: float = 0.0
    th_kd: float = 0.0
    l2e: float = 0.0
    T: float = 4.0
    T_th: float = 4.0

    def __post_init__(self) -> None:
        # fields, not asdict: asdict deep-copies each value, which torch 2.11's Dynamo cannot trace (copy.deepcopy),
        # and a LossWeights is built inside compiled steps (backend_calls).
        for field in fields(self):
            value = getattr(self, field.name)
            if not math.isfinite(value) or value < 0:
                raise EdgekdError(f"loss weight {field.name}={value} must be a finite number >= 0")
        for name in ("T", "T_th"):
            if getattr(self, name) <= 0:
                raise EdgekdError(f"temperature {name}={getattr(self, name)} must be > 0")

    @property
    def reads_teacher_head(self) -> bool:
        """Whether a term forms logits with the teacher's head (kd: teacher logits; th_ce, th_kd: the shared head)."""
        return bool(self.kd or self.th_ce or self.th_kd)

    @property
    def reads_teacher_embedding(self) -> bool:
        """Whether a term reads the teacher embedding z_t (kd, th_kd: the teacher's logits; l2e)."""
        return bool(self.kd or self.th_kd or self.l2e)

    @property
    def needs_teacher_width(self) -> bool:
        """Whether a term reads the student embedding at the teacher's width (th_ce, th_kd: the teacher head; l2e)."""
        return bool(self.th_ce or self.th_kd or self.l2e)

    def active(self) -> tuple[str, ...]:
        """Names of the terms with a non-zero weight, in ``TERM_NAMES`` order."""
        return tuple(name for name in TERM_NAMES if getattr(self, name) != 0)

    def describe(self) -> str:
        """``ce 1, kd 1, th_kd 1, T 4``: the active terms with their weights, then the temperatures their KL terms read.

        One ``T`` when kd is on or th_kd reads the same temperature; ``T_th`` apart only when th_kd is on at another
        temperature than T. A temperature no active term reads is left out.
        """
        items = [f"{name} {getattr(self, name):g}" for name in self.active()]
        if self.kd or (self.th_kd and self.T_th == self.T):
            items.append(f"T {self.T:g}")
        if self.th_kd and self.T_th != self.T:
            items.append(f"T_th {self.T_th:g}")
        return ", ".join(items)


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
