"""``resolve_device``: the torch device a ``--device`` value names (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""

from __future__ import annotations

import torch

from edgekd.errors import EdgekdError


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; ``cuda`` without a visible GPU is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EdgekdError(f"device {name!r} asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)
