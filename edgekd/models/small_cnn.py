"""Small plain CNNs for Fashion-MNIST style inputs (1×28×28): ``cnn_small``, ``cnn_tiny``.

A VGG-like stack of 3×3 conv -> BN -> ReLU blocks with a 2×2 max-pool between stages, global average pooling and a
Linear + BatchNorm1d embedding neck. Global pooling makes any input size ≥ ``2**(stages-1)`` work; ``in_chans`` is
configurable. ``cnn_small`` (128-d) is the teacher and ``cnn_tiny`` (64-d) the student of the classification
example; their widths differ, so a method with a teacher-head or l2e term builds the student at 128-d
(``edgekd.distill.pipeline.student_embed_dim``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from edgekd.errors import EdgekdError
from edgekd.models._builder import build_model
from edgekd.models._cfg import resolve_input_size
from edgekd.models._registry import register_model
from edgekd.models.layers import EmbeddingNeck

__all__ = ["SmallCNN"]

# Fashion-MNIST training-set statistics on the [0, 1] scale.
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530


class ConvBnReLU(nn.Sequential):
    """3×3 conv (no bias) -> BatchNorm2d -> ReLU. Keys: ``conv.weight``, ``bn.*``."""

    def __init__(self, in_c: int, out_c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_c, out_c, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_c)
        self.act = nn.ReLU(inplace=True)


class SmallCNN(nn.Module):
    """Stages of ``depth`` ConvBnReLU blocks, max-pool between stages, global average pool, embedding neck.

    Keys: ``stages.<i>.<j>.{conv,bn}.*`` (the pools hold no parameters), ``neck.fc.weight``, ``neck.bn.*``.

    Args:
        widths: channels per stage.
        depth: conv blocks per stage.
        embed_dim: D, the embedding width.
        input_size: ``S``, ``(H, W)`` or ``(C, H, W)``; default 1×28×28.
        in_chans: input channels (1 unless given).
        stem_stride: stride of the first conv (2 halves the first stage's resolution: about 4× less work there).
    """

    def __init__(
        self,
        widths: Sequence[int] = (32, 64, 128),
        depth: int = 2,
        embed_dim: int = 128,
        input_size: int | Sequence[int] | None = None,
        in_chans: int | None = None,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1 or depth < 1 or embed_dim < 1 or stem_stride < 1:
            raise EdgekdError(
                f"SmallCNN needs widths >= 1, depth >= 1, embed_dim >= 1, stem_stride >= 1; got {widths}, {depth}, "
                f"{embed_dim}, {stem_stride}"
            )
        self.input_size = resolve_input_size(input_size, in_chans, (1, 28, 28))
        min_side = stem_stride * 2 ** (len(widths) - 1)
        if min(self.input_size[1:]) < min_side:
            raise EdgekdError(f"SmallCNN with {len(widths)} stages needs inputs of at least {min_side}×{min_side}")
        self.embed_dim = embed_dim
        stages, in_c = [], self.input_size[0]
        for i, w in enumerate(widths):
            blocks = [] if i == 0 else [nn.MaxPool2d(2)]
            for j in range(depth):
                blocks.append(ConvBnReLU(in_c, w, stride=stem_stride if i == 0 and j == 0 else 1))
                in_c = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.neck = EmbeddingNeck(in_c, embed_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C, H, W)`` normalized images -> ``(B, widths[-1], H', W')`` feature map."""
        return self.stages(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C, H, W)`` normalized images -> ``(B, D)`` embedding."""
        return self.neck(self.forward_features(x).mean(dim=(2, 3)))


def _create_cnn(name: str, model_args: dict, **kwargs) -> SmallCNN:
    return build_model(SmallCNN, name, {**model_args, **kwargs}, mean=(FMNIST_MEAN,), std=(FMNIST_STD,))


@register_model
def cnn_small(**kwargs) -> SmallCNN:
    """Six 3×3 convs (32-64-128), 128-d; about 0.3 M params."""
    return _create_cnn("cnn_small", dict(widths=(32, 64, 128), depth=2, embed_dim=128), **kwargs)


@register_model
def cnn_tiny(**kwargs) -> SmallCNN:
    """Three 3×3 convs (8-16-32), 64-d; about 9 k params."""
    return _create_cnn("cnn_tiny", dict(widths=(8, 16, 32), depth=1, embed_dim=64), **kwargs)
