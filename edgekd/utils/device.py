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


def move_module(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``module.to(device)``, except for a module with parameters on the meta device (a class head left for its
    shards to materialize, ``ClassHead(device="meta")``): it has no data to move and stays as it is."""
    if any(p.is_meta for p in module.parameters()):
        return module
    return module.to(device)
