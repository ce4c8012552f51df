"""``ClassHead``: the classifier that classifier-sharing KD moves between teacher and student.

The head only stores parameters and produces plain logits for inference; training reads ``weight`` and
``bias`` directly through ``edgekd.losses.shared_head_loss`` so that the margin and the fused kernels
never need the ``(B, C)`` logits to exist.
"""

from __future__ import annotations

import torch
from torch import nn

from edgekd.heads.margin import HeadSpec, plain_logits


class ClassHead(nn.Module):
    """A ``(C, D)`` class matrix with an optional bias, read as ``spec`` says.

    Args:
        embed_dim: D, the width of the embeddings it classifies.
        num_classes: C.
        spec: head kind, scale and margin; linear heads get a bias.
    """

    def __init__(self, embed_dim: int, num_classes: int, spec: HeadSpec) -> None:
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if spec.kind == "linear" else None
        # arcface_torch initializes class centres N(0, 0.01); linear heads use the nn.Linear default.
        if spec.normalized:
            nn.init.normal_(self.weight, std=0.01)
        else:
            nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Plain logits (no margin), ``(B, C)`` from ``z: (B, D)``."""
        return plain_logits(z, self.weight, self.bias, self.spec)

    def freeze(self) -> ClassHead:
        """Stop gradients to this head (the shared teacher head, or θ_s in SH-KD stage I1)."""
        self.requires_grad_(False)
        return self


def default_margin(kind: str) -> float:
    """The field's margin of a head kind: ArcFace 0.5 rad, CosFace 0.4, none for the others."""
    return {"arcface": 0.5, "cosface": 0.4}.get(kind, 0.0)


def create_head(kind: str, embed_dim: int, num_classes: int, s: float = 64.0, m: float | None = None) -> ClassHead:
    """A ``ClassHead`` of ``kind`` (linear, cosine, arcface, cosface); m defaults to 0.5 (ArcFace) / 0.4 (CosFace)."""
    if m is None:
        m = default_margin(kind)
    return ClassHead(embed_dim, num_classes, HeadSpec(kind=kind, s=s, m=m))
