"""Loading foreign face checkpoints: arcface_torch state_dicts and TreB1eN / face.evoLVe MobileFaceNet names.

arcface_torch saves a plain ``backbone.state_dict()`` whose key names edgekd's ``mbf*`` and ``r*`` models share, so
those load unchanged. The older TreB1eN / face.evoLVe MobileFaceNet (also arcface_torch's first version and
AdaDistill) uses other names for the same scale-1 layout; ``convert_treb1en_mbf`` renames them (face.md §1.4).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from edgekd.errors import CheckpointError

__all__ = ["convert_treb1en_mbf", "is_treb1en_mbf", "load_arcface_torch_state_dict"]

# Top-level TreB1eN module -> arcface_torch module path.
_TREB1EN_TOP = {
    "conv1": "layers.0",
    "conv2_dw": "layers.1",
    "conv_23": "layers.2",
    "conv_3": "layers.3",
    "conv_34": "layers.4",
    "conv_4": "layers.5",
    "conv_45": "layers.6",
    "conv_5": "layers.7",
    "conv_6_sep": "conv_sep",
    "conv_6_dw": "features.layers.0",
    "linear": "features.layers.2",
    "bn": "features.layers.3",
}
# Inside blocks: Conv_block {conv, bn, prelu}, Linear_block {conv, bn}, Depth_Wise {conv, conv_dw, project},
# Residual {model}. Each maps to a position in arcface_torch's ``layers`` Sequential.
_TREB1EN_INNER = {
    "conv": "layers.0",
    "bn": "layers.1",
    "prelu": "layers.2",
    "conv_dw": "layers.1",
    "project": "layers.2",
    "model": "layers",
}
# First segments only TreB1eN MobileFaceNets have (``conv1`` alone is ambiguous: iResNet has it too).
_TREB1EN_MARKERS = {"conv2_dw", "conv_23", "conv_6_sep", "conv_6_dw"}
_ADADISTILL_PREFIX = "output_layer."
_PREFIXES = ("module.", "_orig_mod.")


def is_treb1en_mbf(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` uses TreB1eN / face.evoLVe MobileFaceNet key names."""
    return any(k.removeprefix(_ADADISTILL_PREFIX).split(".", 1)[0] in _TREB1EN_MARKERS for k in state_dict)


def _convert_key(key: str) -> str:
    parts = key.removeprefix(_ADADISTILL_PREFIX).split(".")
    if parts[0] not in _TREB1EN_TOP:
        return key  # left as is: a strict load reports it as unexpected
    inner = [_TREB1EN_INNER.get(p, p) for p in parts[1:-1]]
    return ".".join([_TREB1EN_TOP[parts[0]], *inner, parts[-1]])


def convert_treb1en_mbf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a TreB1eN / face.evoLVe / AdaDistill MobileFaceNet state_dict to arcface_torch (edgekd) key names.

    Example: ``conv_3.model.0.conv_dw.bn.running_var`` -> ``layers.3.layers.0.layers.1.layers.1.running_var``;
    ``linear.weight`` -> ``features.layers.2.weight``. AdaDistill's ``output_layer.`` prefix is dropped, and its
    affine-free final BatchNorm1d gets weight 1 / bias 0, which computes the same function.

    Args:
        state_dict: TreB1eN-named tensors (a scale-1 network; load it into ``mbf_scale1``).

    Returns:
        A new dict with arcface_torch names and the same tensors.
    """
    out = {_convert_key(k): v for k, v in state_dict.items()}
    mean = out.get("features.layers.3.running_mean")
    if mean is not None and "features.layers.3.weight" not in out and "features.layers.3.bias" not in out:
        out["features.layers.3.weight"] = torch.ones_like(mean)
        out["features.layers.3.bias"] = torch.zeros_like(mean)
    return out


def _read(path: str | os.PathLike) -> object:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any reader failure is a bad file to the user)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {os.fspath(path)!r}: {reason}") from None


def _unwrap(obj: object, source: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source} is not a state_dict of tensors; pass a backbone.pth / model.pt state_dict")
    sd = dict(obj)
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    return sd


def load_arcface_torch_state_dict(
    model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], option: str = "--model"
) -> nn.Module:
    """Load an arcface_torch (or TreB1eN-named) backbone state_dict into ``model`` with ``strict=True``.

    Accepts a plain state_dict, one wrapped as ``{'state_dict': ...}`` or ``{'model': ...}``, and keys prefixed by
    ``module.`` (DataParallel/DDP) or ``_orig_mod.`` (torch.compile). TreB1eN names are converted first.

    Args:
        model: an edgekd model, e.g. ``create_model('mbf')``.
        path_or_state_dict: a ``.pth``/``.pt`` file path or an already loaded mapping.
        option: the command-line option that chose the architecture, named in a mismatch's message (``--model``, or
            ``--teacher-model`` for a teacher).

    Returns:
        ``model``, with the weights loaded.

    Raises:
        CheckpointError: unreadable file, not a state_dict, or keys/shapes that do not fit ``model``.
    """
    if isinstance(path_or_state_dict, Mapping):
        source, obj = "the given mapping", path_or_state_dict
    else:
        source, obj = f"checkpoint {os.fspath(path_or_state_dict)!r}", _read(path_or_state_dict)
    sd = _unwrap(obj, source)
    if is_treb1en_mbf(sd):
        sd = convert_treb1en_mbf(sd)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    reshaped = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        name = getattr(getattr(model, "cfg", None), "name", type(model).__name__)
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (first {missing[0]!r})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (first {unexpected[0]!r})")
        if reshaped:
            k = reshaped[0]
            shapes = f"{tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
            problems.append(f"{len(reshaped)} keys with other shapes (first {k!r}: {shapes})")
        raise CheckpointError(
            f"{source} does not fit model {name!r}: {', '.join(problems)}; pick the {option} it was trained with "
            "(arcface_torch: mbf, mbf_large, mbf_scale1 for scale-1 / TreB1eN, r18/r34/r50/r100) and its embed_dim"
        )
    model.load_state_dict(sd, strict=True)
    return model
