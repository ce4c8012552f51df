"""``Teacher``: the frozen teacher as the training loop sees it, one call per step: ``teacher.embed(images, ...)``.

The teacher side of distillation is more than a module: the backbone sees images normalized its own way (a timm
teacher and a face student differ), its head (the classifier TH-KD shares with the student, with the head spec it
was trained with) is frozen, and its embeddings may come from the on-disk cache instead of a forward pass. A
``Teacher`` owns all of that, so ``fit`` never asks where an embedding comes from (timm's ``DistillationTeacher``
plays the same part).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgekd.data.transforms import normalize_and_flip
from edgekd.distributed.launch import ONE_PROCESS, World
from edgekd.heads import ClassHead
from edgekd.train.teacher_cache import TeacherCache, build_teacher_cache
from edgekd.utils.device import move_module


class Teacher:
    """A frozen teacher: its backbone and that backbone's normalization, its head, and optionally an embedding cache.

    Args:
        backbone: the teacher's embedding network; ``backbone.cfg`` holds the mean and std it was trained with.
        head: the teacher's classifier, read (frozen) by the shared-head terms; None when no term needs it.
        cache: the backbone's embeddings of every training image and its flip (``with_cache``); when set, ``embed``
            reads it and the backbone never runs.
    """

    def __init__(self, backbone: nn.Module, head: ClassHead | None = None, cache: TeacherCache | None = None) -> None:
        self.backbone, self.head, self.cache = backbone, head, cache

    @property
    def mean(self):
        """Per-channel mean the backbone normalizes its input with ([0, 1] pixel scale)."""
        return self.backbone.cfg.mean

    @property
    def std(self):
        """Per-channel std the backbone normalizes its input with."""
        return self.backbone.cfg.std

    @property
    def spec(self):
        """The head's ``HeadSpec`` (kind, s, m), as the teacher was trained with; None without a head."""
        return self.head.spec if self.head is not None else None

    def with_cache(self, dataset, cache_dir: str | Path, device: torch.device, world: World = ONE_PROCESS) -> Teacher:
        """This teacher reading its embeddings of ``dataset`` from ``cache_dir``, computed now on ``device`` if missing
        (by every rank of ``world`` together).

        The cache is keyed by the backbone's weights, the dataset's fingerprint and this teacher's normalization.
        """
        self.backbone.to(device)
        cache = build_teacher_cache(self.backbone, dataset, self.mean, self.std, Path(cache_dir), device, world=world)
        return Teacher(self.backbone, self.head, cache)

    def to(self, device: torch.device) -> Teacher:
        """Put the parts ``embed`` uses on ``device``, frozen (eval mode, no gradients); returns ``self``."""
        for module in (self.head, None if self.cache is not None else self.backbone):
            if module is not None:
                move_module(module, device).eval().requires_grad_(False)
        return self

    @torch.no_grad()
    def embed(self, images: torch.Tensor, indices: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """The teacher's embeddings of one training batch, as the student sees it (mirrored where ``flips``).

        Args:
            images: uint8 ``(B, C, H, W)`` on the training device, neither normalized nor flipped.
            indices: int64 ``(B,)`` dataset indices of the images (CPU); the cache's rows.
            flips: bool ``(B,)`` images the step mirrors (CPU).

        Returns:
            ``z_t: (B, D_t)`` float32 on ``images``' device; a live backbone runs in bf16 autocast on CUDA.
        """
        if self.cache is not None:
            return self.cache.lookup(indices, flips).to(images.device, non_blocking=True)
        x = normalize_and_flip(images, self.mean, self.std, flips)
        with torch.autocast("cuda", torch.bfloat16, enabled=images.device.type == "cuda"):
            return self.backbone(x).float()
