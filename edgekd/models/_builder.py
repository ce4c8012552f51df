"""``build_model``: construct a model class from merged kwargs and attach its ``ModelCfg``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from edgekd.errors import EdgekdError
from edgekd.models._cfg import ModelCfg, jsonable

__all__ = ["build_model"]


def build_model(
    cls: Callable[..., nn.Module],
    name: str,
    kwargs: dict[str, Any],
    mean: Sequence[float],
    std: Sequence[float],
    channel_order: str = "RGB",
) -> nn.Module:
    """Build ``cls(**kwargs)`` and set ``model.cfg``.

    ``cls`` must set ``self.input_size`` (``(C, H, W)``) and ``self.embed_dim``. ``kwargs`` (the variant's defaults
    merged with the user's) are recorded in ``cfg.kwargs`` with ``input_size`` resolved to ``[C, H, W]``.

    Args:
        cls: model class, or a ``functools.partial`` of one with arguments that are implied by ``name``.
        name: registry name, stored as ``cfg.name``.
        kwargs: constructor kwargs.
        mean: normalization mean on the [0, 1] scale; one value, or one per channel (3 values are averaged for a
            one-channel model).
        std: normalization std, as ``mean``.
        channel_order: ``RGB``, ``BGR`` or ``L``; a one-channel model always gets ``L``.

    Raises:
        EdgekdError: a kwarg the model does not take, or a value it rejects.
    """
    params = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        known = ", ".join(p for p in params if p not in ("self", "args", "kwargs"))
        raise EdgekdError(f"model {name!r} does not take option(s) {', '.join(unknown)}; it takes {known}")
    model = cls(**kwargs)
    c = model.input_size[0]
    recorded = dict(kwargs)
    recorded["input_size"] = list(model.input_size)
    recorded.pop("in_chans", None)  # implied by input_size[0]
    model.cfg = ModelCfg(
        name=name,
        input_size=tuple(model.input_size),
        mean=_per_channel(mean, c, name),
        std=_per_channel(std, c, name),
        embed_dim=model.embed_dim,
        channel_order="L" if c == 1 else channel_order,
        kwargs=jsonable(recorded),
    )
    return model


def _per_channel(values: Sequence[float], c: int, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == c:
        return values
    if len(values) == 1 or len(set(values)) == 1:
        return values[:1] * c
    if c == 1:
        return (sum(values) / len(values),)
    raise EdgekdError(f"model {name!r}: {len(values)} mean/std values do not fit {c} input channels")
