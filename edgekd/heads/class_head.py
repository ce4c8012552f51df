"""``ClassHead``: the classifier that classifier-sharing KD moves between teacher and student.

The head only stores parameters and produces plain logits for inference; training reads ``weight`` and
``bias`` directly through ``edgekd.losses.shared_head_loss`` so that the margin and the fused kernels
never need the ``(B, C)`` logits to exist.
"""

from __future__ import annotations

import torch
from safetensors import safe_open
from torch import nn

from edgekd.heads.margin import HeadSpec, plain_logits

# Rows per independently seeded block of a head's initial weight (``initial_rows``).
INIT_BLOCK_ROWS = 4096


def initial_rows(spec: HeadSpec, embed_dim: int, start: int, stop: int, seed: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of the initial ``(C, D)`` weight of a head seeded ``seed``, float32 on the CPU.

    arcface_torch initializes class centres N(0, 0.01); linear heads get nn.Linear's default, U(±1/√D). The rows
    come in blocks of ``INIT_BLOCK_ROWS``, block k drawn from its own generator seeded ``seed + k``: any range of
    classes (a rank's shard of a head of millions) is computed without the others and equals the same rows of the
    whole head, so a class-sharded run starts where one process starts.
    """
    out = torch.empty(stop - start, embed_dim)
    bound = embed_dim**-0.5
    for k in range(start // INIT_BLOCK_ROWS, -(-stop // INIT_BLOCK_ROWS)):
        b0 = k * INIT_BLOCK_ROWS
        block, g = torch.empty(INIT_BLOCK_ROWS, embed_dim), torch.Generator().manual_seed(seed + k)
        if spec.normalized:
            block.normal_(0.0, 0.01, generator=g)
        else:
            block.uniform_(-bound, bound, generator=g)
        lo, hi = max(b0, start), min(b0 + INIT_BLOCK_ROWS, stop)
        out[lo - start : hi - start] = block[lo - b0 : hi - b0]
    return out


class ClassHead(nn.Module):
    """A ``(C, D)`` class matrix with an optional bias, read as ``spec`` says.

    Args:
        embed_dim: D, the width of the embeddings it classifies.
        num_classes: C.
        spec: head kind, scale and margin; linear heads get a bias.
        device: ``"meta"`` leaves the parameters without storage: a class-sharded run materializes only its rows
            (``rows``), so no process builds a head of millions of classes.

    The initial weight depends on one number drawn from torch's global generator, ``init_seed``. ``source`` is the
    bundle file a head on the meta device was loaded from (``load_bundle(lazy_head=True)``); None for a fresh head.
    """

    def __init__(self, embed_dim: int, num_classes: int, spec: HeadSpec, device: str | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.init_seed = int(torch.randint(2**62, (), device="cpu"))
        if device == "meta":
            self.weight = nn.Parameter(torch.empty(num_classes, embed_dim, device="meta"))
        else:
            self.weight = nn.Parameter(initial_rows(spec, embed_dim, 0, num_classes, self.init_seed))
        self.bias = nn.Parameter(torch.zeros(num_classes, device=device)) if spec.kind == "linear" else None
        self.source: str | None = None

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.weight.shape[1]

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight rows ``[start, stop)`` and their bias (None without one), without touching the other classes;
        new tensors the caller owns.

        Copied from the parameters; on the meta device, read from ``source`` alone (a bundle loaded lazily) or
        computed as the head's initialization gives them (a fresh head: ``initial_rows``, the parameters' dtype).
        """
        if not self.weight.is_meta:
            bias = None if self.bias is None else self.bias.detach()[start:stop].clone()
            return self.weight.detach()[start:stop].clone(), bias
        if self.source is not None:  # in the parameters' dtype, as loading the whole head would give them
            with safe_open(self.source, framework="pt") as f:
                weight = f.get_slice("head.weight")[start:stop].to(self.weight.dtype)
                return weight, None if self.bias is None else f.get_slice("head.bias")[start:stop].to(self.bias.dtype)
        weight = initial_rows(self.spec, self.embed_dim, start, stop, self.init_seed).to(self.weight.dtype)
        return weight, None if self.bias is None else torch.zeros(stop - start, dtype=self.bias.dtype)

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


def create_head(
    kind: str, embed_dim: int, num_classes: int, s: float = 64.0, m: float | None = None, device: str | None = None
) -> ClassHead:
    """A ``ClassHead`` of ``kind`` (linear, cosine, arcface, cosface); m defaults to 0.5 (ArcFace) / 0.4 (CosFace).

    ``device="meta"``: no storage yet (see ``ClassHead``)."""
    if m is None:
        m = default_margin(kind)
    return ClassHead(embed_dim, num_classes, HeadSpec(kind=kind, s=s, m=m), device=device)
