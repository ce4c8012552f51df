"""The model registry: decorator-filled name -> entrypoint tables, listing and lookup.

Two kinds of entry:

* a **model**, registered with ``@register_model`` under its function's name (``mbf``, ``r100``, ``cnn_tiny``);
* a **family** of foreign architectures, registered with ``@register_model_family("timm", list_archs=...)`` and
  named ``<prefix>/<arch>`` (``timm/resnet10t``); its entrypoint is called as ``fn(arch, **kwargs)``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["register_model", "register_model_family", "list_models", "is_model", "model_entrypoint"]

EntryPoint = Callable[..., nn.Module]

_model_entrypoints: dict[str, EntryPoint] = {}


@dataclass(frozen=True)
class _Family:
    create: Callable[..., nn.Module]  # create(arch, **kwargs)
    list_archs: Callable[[str | None], list[str]]  # list_archs(pattern) -> arch names, [] if unavailable


_families: dict[str, _Family] = {}


def register_model(fn: EntryPoint) -> EntryPoint:
    """Register ``fn(**kwargs) -> nn.Module`` under ``fn.__name__``.

    Raises:
        ValueError: the name is taken (a programming error, not a user one).
    """
    name = fn.__name__
    if name in _model_entrypoints:
        raise ValueError(f"model {name!r} is registered twice")
    _model_entrypoints[name] = fn
    return fn


def register_model_family(
    prefix: str, list_archs: Callable[[str | None], list[str]]
) -> Callable[[EntryPoint], EntryPoint]:
    """Register ``fn(arch, **kwargs) -> nn.Module`` for every name ``<prefix>/<arch>``.

    Args:
        prefix: family prefix without the slash, e.g. ``timm``.
        list_archs: ``list_archs(pattern)`` returns the family's arch names matching the fnmatch ``pattern`` (all for
            None), or ``[]`` when its optional dependency is missing.
    """

    def decorator(fn: EntryPoint) -> EntryPoint:
        if prefix in _families or "/" in prefix:
            raise ValueError(f"bad or duplicate model family prefix {prefix!r}")
        _families[prefix] = _Family(create=fn, list_archs=list_archs)
        return fn

    return decorator


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered model names, optionally filtered by an fnmatch ``pattern`` (``'mbf*'``, ``'*_tiny'``).

    Family members are listed only when the pattern names the family, e.g. ``list_models('timm/resnet1*')``.
    """
    prefix, sep, arch_pattern = (pattern or "").partition("/")
    if sep and prefix in _families:
        return sorted(f"{prefix}/{a}" for a in _families[prefix].list_archs(arch_pattern or None))
    names = sorted(_model_entrypoints)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def is_model(name: str) -> bool:
    """Whether ``create_model(name)`` knows ``name`` (for ``<prefix>/<arch>``: whether the family has ``arch``)."""
    if name in _model_entrypoints:
        return True
    prefix, sep, arch = name.partition("/")
    return bool(sep and arch and prefix in _families and arch in _families[prefix].list_archs(arch))


def model_entrypoint(name: str) -> EntryPoint | None:
    """The callable that builds ``name`` from kwargs, or None if no entry covers it (family members not checked)."""
    if name in _model_entrypoints:
        return _model_entrypoints[name]
    prefix, sep, arch = name.partition("/")
    if sep and arch and prefix in _families:
        create = _families[prefix].create
        return lambda **kwargs: create(arch, **kwargs)
    return None


def family_prefixes() -> list[str]:
    """Registered family prefixes, e.g. ``['timm']``."""
    return sorted(_families)
