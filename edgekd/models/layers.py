"""Building blocks shared by the model families.

The MobileFaceNet blocks follow arcface_torch ``backbones/mobilefacenet.py`` (face.md §1.1): every block keeps its
sub-layers in a ``Sequential`` named ``layers``, so state-dict keys read ``<block>.layers.<i>.<param>`` exactly as
in arcface_torch checkpoints. Do not rename or reorder sub-modules here: that would break checkpoint loading.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvBlock", "LinearBlock", "DepthWise", "Residual", "GDC", "EmbeddingNeck"]


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class ConvBlock(nn.Module):
    """Conv (no bias) -> BatchNorm2d -> per-channel PReLU.

    Keys: ``layers.0.weight`` (conv), ``layers.1.*`` (BN), ``layers.2.weight`` (PReLU, ``(C_out,)``).
    """

    def __init__(
        self,
        in_c: int,
        out_c: int,
        kernel: int | tuple[int, int] = 1,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, _pair(kernel), stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C_in, H, W)`` -> ``(B, C_out, H', W')``."""
        return self.layers(x)


class LinearBlock(nn.Module):
    """Conv (no bias) -> BatchNorm2d, no activation. Keys: ``layers.0.weight``, ``layers.1.*``."""

    def __init__(
        self,
        in_c: int,
        out_c: int,
        kernel: int | tuple[int, int] = 1,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, _pair(kernel), stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C_in, H, W)`` -> ``(B, C_out, H', W')``."""
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1×1 expand to ``groups`` channels, k×k depthwise, 1×1 linear projection.

    Here ``groups`` is the expansion width G (arcface_torch's naming), not a multiplier. With ``residual`` (stride 1,
    ``in_c == out_c``) the input is added to the output.

    Keys: ``layers.0`` (ConvBlock in->G), ``layers.1`` (ConvBlock G->G, groups G), ``layers.2`` (LinearBlock G->out).
    """

    def __init__(self, in_c: int, out_c: int, residual: bool = False, stride: int = 2, groups: int = 1) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups, kernel=1),
            ConvBlock(groups, groups, kernel=3, stride=stride, padding=1, groups=groups),
            LinearBlock(groups, out_c, kernel=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C_in, H, W)`` -> ``(B, C_out, H/stride, W/stride)``."""
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_block`` residual DepthWise blocks at constant width ``c``. Keys: ``layers.<j>.layers.*``."""

    def __init__(self, c: int, num_block: int, groups: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[DepthWise(c, c, residual=True, stride=1, groups=groups) for _ in range(num_block)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, c, H, W)`` -> ``(B, c, H, W)``."""
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv neck: linear depthwise conv over the whole map, flatten, FC (no bias), BatchNorm1d.

    The flatten is ``torch.flatten(x, 1)`` (``nn.Flatten``), not arcface_torch's ``x.view(x.size(0), -1)``, so an
    ONNX export keeps a dynamic batch (face.md §0.3). It holds no parameters, so the keys are unchanged:
    ``layers.0.layers.{0,1}`` (depthwise conv + BN), ``layers.2.weight`` (FC ``(D, C)``), ``layers.3.*`` (BN1d).

    Args:
        channels: C, the width of the final feature map.
        embed_dim: D, the embedding width.
        kernel: ``(h, w)`` of the final feature map (7×7 at 112² input), so the conv reduces it to 1×1.
    """

    def __init__(self, channels: int, embed_dim: int, kernel: tuple[int, int] = (7, 7)) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(channels, channels, kernel=kernel, groups=channels),
            nn.Flatten(1),
            nn.Linear(channels, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C, h, w)`` -> ``(B, D)``."""
        return self.layers(x)


class EmbeddingNeck(nn.Module):
    """Linear (no bias) + BatchNorm1d from pooled backbone features to the embedding.

    Keys: ``fc.weight`` (``(D, F)``), ``bn.*`` (BN1d).
    """

    def __init__(self, in_features: int, embed_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, embed_dim, bias=False)
        self.bn = nn.BatchNorm1d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, F)`` -> ``(B, D)``."""
        return self.bn(self.fc(x))
