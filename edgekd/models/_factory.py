"""``create_model``: the one way to build a model by name."""

from __future__ import annotations

import difflib

from torch import nn

from edgekd.errors import EdgekdError
from edgekd.models._builder import kwargs_check_only
from edgekd.models._registry import family_prefixes, list_models, model_entrypoint

__all__ = ["create_model", "require_model", "check_model_kwargs"]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name``; the result has ``model.embed_dim`` and ``model.cfg``.

    Kwargs that are None are dropped, so unset CLI options never override a model's own defaults. Typical kwargs:
    ``input_size`` (``S``, ``(H, W)`` or ``(C, H, W)``), ``in_chans``, ``embed_dim``. A checkpoint rebuilds its
    model with ``create_model(cfg.name, **cfg.kwargs)``.

    Args:
        name: a name from ``list_models()``, or ``timm/<arch>`` for any timm architecture.
        **kwargs: constructor options of that model.

    Raises:
        EdgekdError: unknown name or an option the model does not take.
    """
    return require_model(name)(**_given(kwargs))


def check_model_kwargs(name: str, kwargs: dict) -> None:
    """Check ``kwargs`` as ``create_model(name, **kwargs)`` would, without building anything: an unknown model, a
    kwarg it does not take or a value of a type its constructor does not take is a one-line EdgekdError."""
    with kwargs_check_only():
        require_model(name)(**_given(kwargs))


def _given(kwargs: dict) -> dict:
    """``kwargs`` without the None ones: an unset option leaves the model's own default."""
    return {k: v for k, v in kwargs.items() if v is not None}


def require_model(name: str):
    """The entry point of model ``name``; an unknown name is an EdgekdError with the closest names."""
    entrypoint = model_entrypoint(name)
    if entrypoint is None:
        close = difflib.get_close_matches(name, list_models(), n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        families = "".join(f", or {p}/<arch>" for p in family_prefixes())
        raise EdgekdError(f"unknown model {name!r}; {hint}choose one of {', '.join(list_models())}{families}")
    return entrypoint
