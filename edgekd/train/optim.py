"""SGD with linear warm-up and polynomial decay, as arcface_torch trains face models (face.md §7)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def build_optimizer(params: Iterable[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float):
    """SGD over the parameters that require gradients (frozen heads and teachers are left out)."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: every parameter is frozen")
    return torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)


def lr_factor(step: int, total_steps: int, warmup_steps: int, power: float) -> float:
    """Multiplier of the base LR at ``step``: linear warm-up to 1, then ``(1 - progress)^power`` down to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return max(0.0, 1.0 - (step - warmup_steps) / span) ** power


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    """Set every group's LR to ``base_lr * factor``; the schedule is a pure function of the step, so resume is exact."""
    lr = base_lr * factor
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
