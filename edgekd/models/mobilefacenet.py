"""MobileFaceNet as arcface_torch defines it: ``mbf``, ``mbf_large``, ``mbf_scale1``, ``mbf_tiny``.

Paper: "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face Verification on Mobile Devices", Chen et al.,
2018. Layout, widths and state-dict key names follow insightface ``recognition/arcface_torch/backbones/
mobilefacenet.py`` (face.md §1), which is *not* the paper's network: ``mbf`` is the 2× wide variant (2,059,520
params, 512-d). The expansion widths G do not grow with ``scale``; they are fixed multiples of ``base_width`` (64).

Differences from arcface_torch, none of which changes a key or a number: no ``fp16``/autocast flag (precision is the
caller's business), the flatten is ``torch.flatten(x, 1)`` so ONNX export keeps a dynamic batch, the GDC kernel
follows the input size (7×7 at 112², 4×4 at 64²), and ``base_width`` can shrink the whole net (``mbf_tiny``).
arcface_torch and TreB1eN checkpoints load with ``edgekd.models.convert.load_arcface_torch_state_dict``.
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
from edgekd.models.layers import GDC, ConvBlock, DepthWise, Residual

__all__ = ["MobileFaceNet"]

# Four stride-2 stages: 112 -> 56 -> 28 -> 14 -> 7.
_STRIDE = 16


class MobileFaceNet(nn.Module):
    """MobileFaceNet trunk + GDC embedding neck.

    With ``b = base_width`` and ``s = scale`` the widths are ``b·s`` (stages 1–2) and ``2b·s`` (stages 3–4); the
    expansion widths G are ``2b, 2b, 4b, 8b, 4b``; ``conv_sep`` and the GDC run at ``8b``.

    Keys (face.md §1.4): ``layers.{0..7}.*`` (ModuleList: stem ConvBlock, a ConvBlock or Residual, then DepthWise /
    Residual alternating), ``conv_sep.layers.*``, ``features.layers.*`` (GDC).

    Args:
        blocks: residual blocks per stage; ``blocks[0] == 1`` means a single grouped 3×3 ConvBlock instead.
        scale: width multiplier of the trunk (arcface_torch ``mbf`` uses 2, ``mbf_large`` 4).
        base_width: b; 64 in arcface_torch.
        embed_dim: D, the embedding width.
        input_size: ``S``, ``(H, W)`` or ``(C, H, W)``; H and W multiples of 16.
        in_chans: input channels (3 unless given).
    """

    def __init__(
        self,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
        base_width: int = 64,
        embed_dim: int = 512,
        input_size: int | Sequence[int] | None = None,
        in_chans: int | None = None,
    ) -> None:
        super().__init__()
        blocks = tuple(int(n) for n in blocks)
        if len(blocks) != 4 or min(blocks) < 0 or blocks[0] < 1:
            raise EdgekdError(f"MobileFaceNet blocks must be 4 counts with blocks[0] >= 1; got {blocks}")
        if scale < 1 or base_width < 1 or embed_dim < 1:
            raise EdgekdError(
                f"MobileFaceNet needs scale, base_width and embed_dim >= 1; got {scale}, {base_width}, {embed_dim}"
            )
        self.input_size = resolve_input_size(input_size, in_chans, (3, 112, 112), multiple=_STRIDE)
        self.embed_dim = embed_dim
        b = base_width
        c1, c2 = b * scale, 2 * b * scale
        self.layers = nn.ModuleList([ConvBlock(self.input_size[0], c1, kernel=3, stride=2, padding=1)])
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c1, c1, kernel=3, stride=1, padding=1, groups=b))
        else:
            self.layers.append(Residual(c1, blocks[0], groups=2 * b))
        self.layers.extend(
            [
                DepthWise(c1, c1, stride=2, groups=2 * b),
                Residual(c1, blocks[1], groups=2 * b),
                DepthWise(c1, c2, stride=2, groups=4 * b),
                Residual(c2, blocks[2], groups=4 * b),
                DepthWise(c2, c2, stride=2, groups=8 * b),
                Residual(c2, blocks[3], groups=4 * b),
            ]
        )
        self.conv_sep = ConvBlock(c2, 8 * b, kernel=1)
        final_map = (self.input_size[1] // _STRIDE, self.input_size[2] // _STRIDE)
        self.features = GDC(8 * b, embed_dim, kernel=final_map)
        self._init_weights()

    def _init_weights(self) -> None:
        # arcface_torch: kaiming normal (fan_out) for conv and FC, BN2d weight 1 / bias 0.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C, H, W)`` normalized images -> ``(B, 8b, H/16, W/16)`` feature map."""
        for layer in self.layers:
            x = layer(x)
        return self.conv_sep(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C, H, W)`` normalized images -> ``(B, D)`` embedding (not L2-normalized)."""
        return self.features(self.forward_features(x))


def _create_mbf(name: str, model_args: dict, **kwargs) -> MobileFaceNet:
    return build_model(MobileFaceNet, name, {**model_args, **kwargs}, mean=FACE_MEAN, std=FACE_STD)


@register_model
def mbf(**kwargs) -> MobileFaceNet:
    """arcface_torch ``mbf``: scale 2, blocks (1, 4, 6, 2), 512-d; 2,059,520 params, 0.45 GMACs at 112²."""
    return _create_mbf("mbf", dict(blocks=(1, 4, 6, 2), scale=2, base_width=64, embed_dim=512), **kwargs)


@register_model
def mbf_large(**kwargs) -> MobileFaceNet:
    """arcface_torch ``mbf_large``: scale 4, blocks (2, 8, 12, 4), 512-d; 6,314,880 params."""
    return _create_mbf("mbf_large", dict(blocks=(2, 8, 12, 4), scale=4, base_width=64, embed_dim=512), **kwargs)


@register_model
def mbf_scale1(**kwargs) -> MobileFaceNet:
    """Scale-1 MobileFaceNet (arcface_torch before 2021-07-22, the TreB1eN / face.evoLVe layout); 1.20 M params."""
    return _create_mbf("mbf_scale1", dict(blocks=(1, 4, 6, 2), scale=1, base_width=64, embed_dim=512), **kwargs)


@register_model
def mbf_tiny(**kwargs) -> MobileFaceNet:
    """Tiny MobileFaceNet (base width 8, blocks (1, 2, 2, 1), 128-d; about 30 k params) for tests and demos."""
    return _create_mbf("mbf_tiny", dict(blocks=(1, 2, 2, 1), scale=2, base_width=8, embed_dim=128), **kwargs)
