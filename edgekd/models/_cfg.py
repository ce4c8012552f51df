"""``ModelCfg``: the data config attached to every model as ``model.cfg``, and input-size helpers.

Transforms, checkpoints and export read the config instead of guessing: input size, normalization, embedding width,
channel order, and the constructor kwargs that rebuild the model with ``create_model(cfg.name, **cfg.kwargs)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from edgekd.errors import EdgekdError

__all__ = ["ModelCfg", "resolve_input_size", "jsonable"]

CHANNEL_ORDERS = ("RGB", "BGR", "L")


@dataclass(frozen=True)
class ModelCfg:
    """What a model expects as input and what it returns.

    Args:
        name: registry name, e.g. ``mbf`` or ``timm/resnet10t``.
        input_size: ``(C, H, W)`` the model was built for.
        mean: per-channel mean on the [0, 1] pixel scale (timm convention); ``len(mean) == C``.
        std: per-channel std on the [0, 1] pixel scale; ``len(std) == C``.
        embed_dim: width D of the ``(B, D)`` embedding ``forward`` returns.
        channel_order: ``RGB``, ``BGR`` or ``L`` (one grey channel, PIL's mode name).
        kwargs: the resolved constructor kwargs, JSON-serializable; ``create_model(name, **kwargs)`` rebuilds the
            same architecture.
    """

    name: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    embed_dim: int
    channel_order: str = "RGB"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = self.input_size[0]
        if len(self.mean) != c or len(self.std) != c:
            raise EdgekdError(f"model {self.name!r}: mean/std need {c} values for {c} input channels")
        if self.channel_order not in CHANNEL_ORDERS:
            raise EdgekdError(f"model {self.name!r}: channel_order must be one of {', '.join(CHANNEL_ORDERS)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (tuples become lists); ``ModelCfg.from_dict`` reverses it."""
        return jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelCfg:
        """Rebuild a config saved with ``to_dict`` (for example read back from JSON or a checkpoint)."""
        return cls(
            name=str(d["name"]),
            input_size=tuple(int(v) for v in d["input_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            embed_dim=int(d["embed_dim"]),
            channel_order=str(d.get("channel_order", "RGB")),
            kwargs=dict(d.get("kwargs", {})),
        )


def resolve_input_size(
    input_size: int | Sequence[int] | None,
    in_chans: int | None,
    default: tuple[int, int, int],
    multiple: int = 1,
) -> tuple[int, int, int]:
    """Turn ``input_size`` (``S``, ``(H, W)`` or ``(C, H, W)``) and ``in_chans`` into a checked ``(C, H, W)``.

    Args:
        input_size: side, ``(H, W)`` or ``(C, H, W)``; None keeps the default H, W.
        in_chans: number of input channels; None takes C from ``input_size`` or the default.
        default: the model's own ``(C, H, W)``.
        multiple: H and W must be positive multiples of this (the network's total stride when a layer depends on
            the final feature-map size).
    """
    c, h, w = default
    if input_size is not None:
        size = [input_size] if isinstance(input_size, int) else list(input_size)
        if len(size) == 1:
            h = w = size[0]
        elif len(size) == 2:
            h, w = size
        elif len(size) == 3:
            if in_chans is not None and in_chans != size[0]:
                raise EdgekdError(f"input_size {tuple(size)} has {size[0]} channels but in_chans={in_chans}")
            c, h, w = size
        else:
            raise EdgekdError(f"input_size must be S, (H, W) or (C, H, W); got {input_size!r}")
    if in_chans is not None:
        c = in_chans
    c, h, w = int(c), int(h), int(w)
    if c < 1 or h < 1 or w < 1 or h % multiple or w % multiple:
        need = f"positive multiples of {multiple}" if multiple > 1 else "positive"
        raise EdgekdError(f"input size {(c, h, w)} is not supported: C >= 1 and H, W {need} (e.g. {default[1]})")
    return c, h, w


def jsonable(obj: Any) -> Any:
    """``obj`` with tuples turned into lists, checked to be JSON-serializable (so checkpoints can store it)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    try:
        json.dumps(obj)
    except TypeError:
        raise EdgekdError(
            f"model kwarg value {obj!r} is not JSON-serializable; pass plain numbers, strings or lists"
        ) from None
    return obj
