"""Partial FC's class sampling (``--sample-rate r``): which rows of a class head one training step computes.

Partial FC (insightface's arcface_torch, ``partial_fc_v2``) trains heads of millions of identities by computing each
step's softmax over a subset of the classes: every class that labels a row of the global batch (the positives) plus
classes drawn uniformly from the others, ``⌈r·C⌉`` in all (all the positives if they are more). Under torchrun each
rank draws from its own class shard, ``⌈r·C_r⌉`` of its ``C_r`` classes, keeping the positives it owns.

Every head term (ce, kd, th_ce, th_kd) is then computed over the same class set for both heads (SPEC §4): the
softmaxes and the KL are those of the sampled classes, a different objective from the full one, exact for it. Rows
not drawn get no gradient from the loss in that step (weight decay and momentum still move them, as in Partial FC).
``r = 1`` draws nothing: the exact loss.

The draw is a function of ``(seed, step, shard start)``, not of a running generator, so a resumed run draws what the
uninterrupted run drew.
"""

from __future__ import annotations

import hashlib
import math

import torch


class ClassSampler:
    """Draws the head rows step ``step`` computes, for a run's ``rate`` and ``seed``."""

    def __init__(self, rate: float, seed: int) -> None:
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"sample rate {rate} is not in (0, 1]")
        self.rate, self.seed = rate, seed

    def count(self, size: int) -> int:
        """Classes drawn from a shard of ``size`` (before adding positives beyond it)."""
        return min(size, math.ceil(self.rate * size))

    def rows(self, step: int, labels: torch.Tensor, start: int, size: int) -> torch.Tensor | None:
        """Sorted rows (int64, in ``[0, size)``) of the classes ``[start, start + size)`` that step ``step`` computes.

        Args:
            step: the training step (0-based).
            labels: (N,) the global batch's class ids (every rank's rows under torchrun).
            start, size: the shard: the whole head is ``0, C``.

        Returns:
            None when every row is computed (rate 1, or a draw that would keep them all).
        """
        count = self.count(size)
        if count >= size:
            return None
        local = labels - start
        positives = torch.unique(local[(local >= 0) & (local < size)])  # sorted
        if positives.numel() >= count:
            return positives
        generator = torch.Generator(device=labels.device).manual_seed(self._seed_of(step, start))
        keys = torch.rand(size, generator=generator, device=labels.device)
        keys[positives] = 2.0  # above every draw: the positives are always among the top ``count``
        return keys.topk(count, sorted=False).indices.sort().values

    def compiled_rows(self, step: int, labels: torch.Tensor, start: int, size: int) -> torch.Tensor | None:
        """``rows`` for a compiled step: their count varies with the positives, so torch.compile is told at once
        (one compile with a symbolic count, not a second one when the count first changes)."""
        rows = self.rows(step, labels, start, size)
        if rows is not None:
            torch._dynamo.maybe_mark_dynamic(rows, 0)
        return rows

    def _seed_of(self, step: int, start: int) -> int:
        digest = hashlib.blake2b(f"{self.seed},{step},{start}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1  # manual_seed takes a non-negative 63-bit integer


def relabel(labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``labels`` (class ids local to a shard) as positions in ``rows`` (sorted), -1 where the class was not drawn."""
    position = torch.searchsorted(rows, labels).clamp_max(rows.numel() - 1)
    return torch.where(rows[position] == labels, position, torch.full_like(position, -1))
