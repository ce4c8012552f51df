"""Batch transforms applied after loading: uint8 batches in, normalized float32 batches out, flips on any dtype.

Datasets yield uint8 ``(C, H, W)`` tensors and stay free of normalization, so the same cached images feed models with
different conventions. Face models use ``mean = std = 0.5``, i.e. ``(x - 127.5) / 127.5``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from edgekd.errors import DataError

# Face models (MobileFaceNet, iResNet, arcface_torch's) take RGB as (x_255 - 127.5) / 127.5 = (x - 0.5) / 0.5 on the
# [0, 1] scale (face.md §0.4); a one-channel model gets the same value once (models/_builder.py).
FACE_MEAN = (0.5, 0.5, 0.5)
FACE_STD = (0.5, 0.5, 0.5)


def _per_channel(value: float | Sequence[float], channels: int, like: torch.Tensor, what: str) -> torch.Tensor:
    """``value`` as a float32 ``(1, C, 1, 1)`` tensor on ``like``'s device; a scalar or 1-element list broadcasts."""
    v = torch.as_tensor(value, dtype=torch.float32, device=like.device).flatten()
    if v.numel() == 1:
        v = v.expand(channels)
    if v.numel() != channels:
        raise DataError(f"{what} has {v.numel()} values but the images have {channels} channels")
    return v.view(1, channels, 1, 1)


def normalize(batch: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float]) -> torch.Tensor:
    """Map a uint8 batch to float32 ``(x / 255 - mean) / std`` per channel, on the batch's device.

    Args:
        batch: uint8 images ``(B, C, H, W)``.
        mean: per-channel mean in [0, 1] units (a scalar broadcasts over channels).
        std: per-channel standard deviation in [0, 1] units.

    Returns:
        float32 ``(B, C, H, W)``.
    """
    if batch.dtype != torch.uint8:
        raise DataError(f"normalize expects a uint8 batch, got {batch.dtype}; normalize each batch exactly once")
    if batch.dim() != 4:
        raise DataError(f"normalize expects a (B, C, H, W) batch, got shape {tuple(batch.shape)}")
    c = batch.shape[1]
    m = _per_channel(mean, c, batch, "mean")
    s = _per_channel(std, c, batch, "std")
    return (batch.float() / 255.0 - m) / s


def hflip(batch: torch.Tensor) -> torch.Tensor:
    """Mirror images left-right (the last axis); works for uint8 and float batches, ``(..., H, W)``."""
    return torch.flip(batch, dims=(-1,))


def normalize_and_flip(
    batch: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float], flips: torch.Tensor
) -> torch.Tensor:
    """``normalize`` a uint8 ``(B, C, H, W)`` batch, mirroring the images where ``flips`` ``(B,)`` (bool) is set."""
    x = normalize(batch, mean, std)
    mask = flips.to(batch.device).view(-1, *([1] * (batch.dim() - 1)))
    return torch.where(mask, hflip(x), x)


def random_hflip(batch: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image of a ``(B, C, H, W)`` batch with probability ``p`` (draws on ``generator``, CPU)."""
    flip = torch.rand(batch.shape[0], generator=generator) < p
    flip = flip.to(batch.device).view(-1, *([1] * (batch.dim() - 1)))
    return torch.where(flip, hflip(batch), batch)


def to_uint8_batch(
    images: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray], channels_last: bool = False
) -> torch.Tensor:
    """Stack images into one contiguous uint8 ``(B, C, H, W)`` tensor.

    Args:
        images: a ``(B, C, H, W)`` or ``(C, H, W)`` uint8 tensor/array, or a sequence of ``(C, H, W)`` ones
            (``(H, W, C)`` or ``(H, W)`` with ``channels_last``, as PIL/numpy decode them).
        channels_last: the input is ``(..., H, W, C)`` (or ``(..., H, W)`` grayscale).

    Returns:
        uint8 ``(B, C, H, W)``.
    """
    if isinstance(images, (torch.Tensor, np.ndarray)):
        items = [images] if images.ndim in ((3, 2) if channels_last else (3,)) else list(images)
    else:
        items = list(images)
    if not items:
        raise DataError("to_uint8_batch got no images")
    out = []
    for img in items:
        t = torch.as_tensor(np.asarray(img)) if isinstance(img, np.ndarray) else img
        if t.dtype != torch.uint8:
            raise DataError(f"expected uint8 images, got {t.dtype}")
        if channels_last:
            t = t.unsqueeze(-1) if t.dim() == 2 else t
            t = t.permute(2, 0, 1)
        if t.dim() != 3:
            raise DataError(f"expected (C, H, W) images, got shape {tuple(t.shape)}")
        out.append(t)
    if len({tuple(t.shape) for t in out}) > 1:
        raise DataError("images in one batch differ in shape; resize them to one image_size first")
    return torch.stack(out).contiguous()
