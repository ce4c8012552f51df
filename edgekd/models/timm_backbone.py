"""Any timm architecture as an embedding backbone, named ``timm/<arch>`` (``timm/resnet10t``, ``timm/convnext_atto``).

The backbone is ``timm.create_model(arch, num_classes=0, pretrained=False, in_chans=C)`` (pooled features, no
classifier, no download), followed by a Linear (no bias) + BatchNorm1d neck to ``embed_dim``. timm is imported
inside functions, so ``import edgekd`` works without it. Mean, std and the default input size come from the
architecture's timm config; architectures with a fixed input size (ViTs) are built for the requested size.
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from edgekd.errors import EdgekdError, EdgekdWarning, MissingDependency
from edgekd.models._builder import build_model
from edgekd.models._cfg import resolve_input_size
from edgekd.models._registry import register_model_family
from edgekd.models.layers import EmbeddingNeck

__all__ = ["TimmBackbone"]


def _timm():
    try:
        import timm
    except ImportError:
        raise MissingDependency("timm is not installed; pip install timm to use timm/<arch> models") from None
    return timm


def _list_timm_archs(pattern: str | None) -> list[str]:
    try:
        timm = _timm()
    except MissingDependency:
        return []
    if pattern is not None and not any(ch in pattern for ch in "*?["):
        return [pattern] if timm.is_model(pattern) else []
    names = timm.list_models()
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


class TimmBackbone(nn.Module):
    """``timm`` feature extractor + embedding neck.

    Keys: ``backbone.*`` (timm's own names, classifier removed), ``neck.fc.weight`` (``(D, F)``), ``neck.bn.*``.

    Args:
        arch: a timm architecture name (``timm.list_models()``).
        embed_dim: D, the embedding width.
        input_size: ``S``, ``(H, W)`` or ``(C, H, W)``; default from the architecture's timm config.
        in_chans: input channels (3 unless given).
        drop_rate: dropout before timm's (removed) classifier, passed to timm.
        drop_path_rate: stochastic depth rate, passed to timm (None: timm's default).
        timm_kwargs: any further ``timm.create_model`` kwargs (JSON-serializable values only).
    """

    def __init__(
        self,
        arch: str,
        embed_dim: int = 512,
        input_size: int | Sequence[int] | None = None,
        in_chans: int | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float | None = None,
        timm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        timm = _timm()
        pcfg = timm.models.get_pretrained_cfg(arch)
        default = tuple(pcfg.input_size) if pcfg is not None and pcfg.input_size else (3, 224, 224)
        self.input_size = resolve_input_size(input_size, in_chans, default)
        if embed_dim < 1:
            raise EdgekdError(f"timm/{arch} needs embed_dim >= 1; got {embed_dim}")
        self.embed_dim = embed_dim
        kwargs = dict(timm_kwargs or {})
        kwargs["drop_rate"] = drop_rate
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = drop_path_rate
        if pcfg is not None and pcfg.fixed_input_size and self.input_size[1:] != default[1:]:
            kwargs["img_size"] = self.input_size[1:]
        self.backbone = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=self.input_size[0], **kwargs)
        # timm >= 1.0: head_hidden_size is the width forward() returns with num_classes=0 (it differs from
        # num_features when a pre-logits conv follows the pooling, as in MobileNetV3).
        features = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.neck = EmbeddingNeck(features, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C, H, W)`` normalized images -> ``(B, D)`` embedding."""
        return self.neck(self.backbone(x))


@register_model_family("timm", list_archs=_list_timm_archs)
def timm_family(arch: str, **kwargs) -> TimmBackbone:
    """Build ``timm/<arch>``: a timm backbone with a Linear + BatchNorm1d neck to ``embed_dim`` (default 512)."""
    timm = _timm()
    arch, _, tag = arch.partition(".")
    if tag:
        warnings.warn(
            f"timm/{arch}.{tag}: the pretrained tag is ignored and the weights are random (edgekd downloads "
            f"nothing); use timm/{arch}, and a checkpoint (--teacher, --init) to start from trained weights",
            EdgekdWarning,
            stacklevel=2,
        )
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm/' + c for c in close)}?" if close else ""
        raise EdgekdError(f"unknown timm architecture {arch!r}{hint} (see timm.list_models())")
    pcfg = timm.models.get_pretrained_cfg(arch)
    mean = pcfg.mean if pcfg is not None and pcfg.mean else (0.485, 0.456, 0.406)
    std = pcfg.std if pcfg is not None and pcfg.std else (0.229, 0.224, 0.225)
    model_args = {"embed_dim": 512, **kwargs}
    return build_model(partial(TimmBackbone, arch), f"timm/{arch}", model_args, mean=mean, std=std)
