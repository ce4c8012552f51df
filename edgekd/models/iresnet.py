"""iResNet face teachers as arcface_torch defines them: ``r18``, ``r34``, ``r50``, ``r100``, ``r_tiny``.

Paper: "Improved Residual Networks for Image and Video Recognition", Duta et al., 2020, as used by ArcFace
(Deng et al., 2019). Layout, init and state-dict key names follow insightface ``recognition/arcface_torch/backbones/
iresnet.py`` (face.md §2), so arcface_torch ``backbone.pth`` files load unchanged.

Differences from arcface_torch, none of which changes a key or a number at 112²: no ``fp16``/autocast flag, the
``fc`` input width follows the input size (``C_4·H/16·W/16`` instead of a fixed 7·7), stage widths are a parameter
(``r_tiny``), and ``in_chans`` is configurable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from edgekd.data.transforms import FACE_MEAN, FACE_STD
from edgekd.errors import EdgekdError
from edgekd.models._builder import build_model
from edgekd.models._cfg import resolve_input_size
from edgekd.models._registry import register_model

__all__ = ["IResNet", "IBasicBlock"]

_WIDTHS = (64, 128, 256, 512)
# The stem keeps the resolution; each of the four stages halves it: 112 -> 56 -> 28 -> 14 -> 7.
_STRIDE = 16


def _conv3x3(in_c: int, out_c: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_c, out_c, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-BN residual block: ``bn1 -> conv1 -> bn2 -> prelu -> conv2 (stride) -> bn3``, plus identity/downsample.

    There is no activation after the add. Keys: ``bn1.*``, ``conv1.weight``, ``bn2.*``, ``prelu.weight``,
    ``conv2.weight``, ``bn3.*`` and, when the shape changes, ``downsample.0.weight`` (1×1 conv) + ``downsample.1.*``.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C_in, H, W)`` -> ``(B, planes, H/stride, W/stride)``."""
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """iResNet trunk + ``bn2 -> flatten -> dropout -> fc -> features`` embedding head.

    ``features`` is a BatchNorm1d whose weight is frozen at 1 (``requires_grad=False``), as in arcface_torch.

    Args:
        layers: blocks per stage, e.g. ``(3, 4, 14, 3)`` for r50.
        widths: channels per stage; the stem uses ``widths[0]``.
        embed_dim: D, the embedding width.
        dropout: dropout before ``fc`` (0 in arcface_torch training and in export).
        input_size: ``S``, ``(H, W)`` or ``(C, H, W)``; H and W multiples of 16.
        in_chans: input channels (3 unless given).
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 14, 3),
        widths: Sequence[int] = _WIDTHS,
        embed_dim: int = 512,
        dropout: float = 0.0,
        input_size: int | Sequence[int] | None = None,
        in_chans: int | None = None,
    ) -> None:
        super().__init__()
        layers, widths = tuple(int(n) for n in layers), tuple(int(w) for w in widths)
        if len(layers) != 4 or len(widths) != 4 or min(layers) < 1 or min(widths) < 1:
            raise EdgekdError(f"IResNet needs 4 stage depths >= 1 and 4 widths >= 1; got {layers}, {widths}")
        if embed_dim < 1 or not 0.0 <= dropout < 1.0:
            raise EdgekdError(f"IResNet needs embed_dim >= 1 and 0 <= dropout < 1; got {embed_dim}, {dropout}")
        self.input_size = resolve_input_size(input_size, in_chans, (3, 112, 112), multiple=_STRIDE)
        self.embed_dim = embed_dim
        self.inplanes = widths[0]
        self.conv1 = _conv3x3(self.input_size[0], widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        self.layer1 = self._make_layer(widths[0], layers[0], stride=2)
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        map_h, map_w = self.input_size[1] // _STRIDE, self.input_size[2] // _STRIDE
        self.fc = nn.Linear(widths[3] * map_h * map_w, embed_dim)
        self.features = nn.BatchNorm1d(embed_dim, eps=1e-5)
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-5),
            )
        stage = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        stage += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self) -> None:
        # arcface_torch: conv weights N(0, 0.1), BN2d weight 1 / bias 0, fc left at PyTorch's default,
        # features (BN1d) weight fixed at 1 and not trained.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C, H, W)`` normalized images -> ``(B, widths[3], H/16, W/16)`` after ``bn2``."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.bn2(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C, H, W)`` normalized images -> ``(B, D)`` embedding (not L2-normalized)."""
        x = self.dropout(torch.flatten(self.forward_features(x), 1))
        return self.features(self.fc(x))


def _create_iresnet(name: str, model_args: dict, **kwargs) -> IResNet:
    return build_model(IResNet, name, {**model_args, **kwargs}, mean=FACE_MEAN, std=FACE_STD)


@register_model
def r18(**kwargs) -> IResNet:
    """arcface_torch iResNet-18: blocks (2, 2, 2, 2), 512-d; 24.03 M params."""
    return _create_iresnet("r18", dict(layers=(2, 2, 2, 2), widths=_WIDTHS, embed_dim=512), **kwargs)


@register_model
def r34(**kwargs) -> IResNet:
    """arcface_torch iResNet-34: blocks (3, 4, 6, 3), 512-d; 34.14 M params."""
    return _create_iresnet("r34", dict(layers=(3, 4, 6, 3), widths=_WIDTHS, embed_dim=512), **kwargs)


@register_model
def r50(**kwargs) -> IResNet:
    """arcface_torch iResNet-50: blocks (3, 4, 14, 3), 512-d; 43.59 M params."""
    return _create_iresnet("r50", dict(layers=(3, 4, 14, 3), widths=_WIDTHS, embed_dim=512), **kwargs)


@register_model
def r100(**kwargs) -> IResNet:
    """arcface_torch iResNet-100: blocks (3, 13, 30, 3), 512-d; 65.16 M params."""
    return _create_iresnet("r100", dict(layers=(3, 13, 30, 3), widths=_WIDTHS, embed_dim=512), **kwargs)


@register_model
def r_tiny(**kwargs) -> IResNet:
    """Tiny iResNet (widths 16–128, one block per stage, 128-d; about 1.1 M params) for tests and demo teachers."""
    return _create_iresnet("r_tiny", dict(layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), embed_dim=128), **kwargs)


@register_model
def r_small(**kwargs) -> IResNet:
    """Small iResNet (widths 32–256, two blocks per stage, 512-d) for CPU demos: at 32×32 it costs about as much
    as MobileFaceNet but holds more parameters in dense convolutions, so it trains as a stronger teacher."""
    return _create_iresnet("r_small", dict(layers=(2, 2, 2, 2), widths=(32, 64, 128, 256), embed_dim=512), **kwargs)
