"""``build_model``: construct a model class from merged kwargs and attach its ``ModelCfg``.

It checks the kwargs against the constructor's signature first: a name it does not take, or a value whose type its
annotation (or, without one, its default) rules out, is a one-line ``EdgekdError`` naming the model and the kwarg.
Inside ``kwargs_check_only()`` it checks and builds nothing, which is how ``check_model_kwargs`` checks a user's
kwargs before any work starts.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from torch import nn

from edgekd.errors import EdgekdError
from edgekd.models._cfg import ModelCfg, jsonable
from edgekd.rules import describe, is_int, is_real

__all__ = ["build_model", "kwargs_check_only"]

_check_only: ContextVar[bool] = ContextVar("edgekd_model_kwargs_check_only", default=False)


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

    Returns:
        The model; None inside ``kwargs_check_only()``.

    Raises:
        EdgekdError: a kwarg the model does not take, a value of a type it does not take, or a value it rejects.
    """
    _check_kwargs(cls, name, kwargs)
    if _check_only.get():
        return None
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


@contextlib.contextmanager
def kwargs_check_only() -> Iterator[None]:
    """Within it, ``build_model`` checks its kwargs and returns None: a model entry point called here builds nothing."""
    token = _check_only.set(True)
    try:
        yield
    finally:
        _check_only.reset(token)


def _check_kwargs(cls: Callable[..., nn.Module], name: str, kwargs: dict[str, Any]) -> None:
    """Refuse a kwarg ``cls`` does not take, and a value its annotation (or its default's type) rules out."""
    params = _parameters(cls)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    known = [p for p, v in params.items() if v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
    unknown = sorted(set(kwargs) - set(known))
    if unknown and not takes_any:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        guess = f" (did you mean {close[0]}?)" if close else ""
        raise EdgekdError(
            f"model {name!r} does not take option(s) {', '.join(unknown)}{guess}; it takes {', '.join(known)}"
        )
    for key, value in kwargs.items():
        param = params.get(key)
        hint = _type_hint(param) if param is not None else Any
        if not _fits(value, hint):
            example = (
                "" if param.default in (None, inspect.Parameter.empty) else f', e.g. "{key}": {_json(param.default)}'
            )
            raise EdgekdError(f"model {name!r} option {key} is {describe(value)}; give {_hint_text(hint)}{example}")


def _parameters(cls: Callable[..., nn.Module]) -> Mapping[str, inspect.Parameter]:
    """``cls``'s parameters, with their annotations evaluated where the module can (``from __future__ import
    annotations`` leaves them as strings); an annotation that cannot be evaluated stays a string and checks nothing."""
    try:
        return inspect.signature(cls, eval_str=True).parameters
    except (NameError, TypeError, SyntaxError):
        return inspect.signature(cls).parameters


def _type_hint(param: inspect.Parameter) -> Any:
    """The type ``param`` takes: its annotation; without one, its default's type when that is a plain value."""
    if param.annotation is not inspect.Parameter.empty:
        return param.annotation if not isinstance(param.annotation, str) else Any
    if type(param.default) in (bool, int, float, str):
        return float if type(param.default) is int else type(param.default)  # a default of 0 takes 0.5 as well
    return Any


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of type ``hint``: plain types, None, unions, sequences and mappings of them; bools are not
    numbers, floats are finite, an int fits a float; any other annotation fits everything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is None or hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is int:
        return is_int(value)
    if hint is float:
        return is_real(value) and math.isfinite(value)
    if hint in (bool, str):
        return isinstance(value, hint)
    if origin in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple, Sequence):
        item = args[0] if args else Any  # Sequence[int], tuple[int, ...]
        return isinstance(value, (list, tuple)) and all(_fits(v, item) for v in value)
    if origin in (dict, Mapping, typing.Mapping) or hint in (dict, Mapping):
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return True


def _hint_text(hint: Any) -> str:
    """``hint`` as a message says it: ``a whole number or a list of whole numbers or null``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_hint_text(arg) for arg in args)
    if origin in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple, Sequence):
        item = _hint_text(args[0]) if args else "values"
        return f"a list of {item.removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin in (dict, Mapping, typing.Mapping) or hint in (dict, Mapping):
        return "a mapping of names to values"
    names = {int: "a whole number", float: "a finite number", bool: "true or false", str: "a string"}
    return "null" if hint is None or hint is type(None) else names.get(hint, getattr(hint, "__name__", str(hint)))


def _json(value: Any) -> str:
    try:
        return json.dumps(jsonable(value))
    except EdgekdError:
        return repr(value)


def _per_channel(values: Sequence[float], c: int, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == c:
        return values
    if len(values) == 1 or len(set(values)) == 1:
        return values[:1] * c
    if c == 1:
        return (sum(values) / len(values),)
    raise EdgekdError(f"model {name!r}: {len(values)} mean/std values do not fit {c} input channels")
