"""Model bundles: a backbone, its head, and their metadata in one ``.safetensors`` file.

Keys are ``backbone.*`` (arcface_torch names for face models) and ``head.*``; the safetensors metadata entry
``edgekd`` holds JSON with the bundle's format version (``edgekd.formats``), the model name and kwargs, the head spec
and class count, and whatever the writer adds (method, step, data fingerprint). ``load_bundle`` also accepts a plain
arcface_torch state_dict (``.pt`` / ``.pth``) when told which model it is.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from edgekd.atomic import atomic_path
from edgekd.errors import CheckpointError
from edgekd.formats import FORMATS, check_format, parse_versioned_json, stamp
from edgekd.heads import ClassHead, HeadSpec
from edgekd.models import create_model
from edgekd.models.convert import load_arcface_torch_state_dict
from edgekd.version import __version__


@dataclass
class Bundle:
    """What a checkpoint holds. ``cfg`` is the backbone's ``ModelCfg`` (input size, mean, std, embed_dim)."""

    backbone: nn.Module
    head: ClassHead | None = None
    meta: dict = field(default_factory=dict)

    @property
    def cfg(self):
        return self.backbone.cfg


def bundle_modules(bundle: Bundle) -> list[tuple[str, nn.Module]]:
    """The (key prefix, module) pairs the bundle holds."""
    parts = (("backbone", bundle.backbone), ("head", bundle.head))
    return [(prefix, module) for prefix, module in parts if module is not None]


def bundle_state_dict(bundle: Bundle) -> dict[str, torch.Tensor]:
    """All tensors of the bundle under ``backbone.`` / ``head.`` prefixes (contiguous, CPU)."""
    return {
        f"{prefix}.{key}": value.detach().to("cpu").contiguous()
        for prefix, module in bundle_modules(bundle)
        for key, value in module.state_dict().items()
    }


def assign_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state, strict=True)``; a module on the meta device (no storage) takes the tensors
    themselves as its parameters, converted to the dtypes it declares, as a copy into existing parameters converts."""
    assign = any(p.is_meta for p in module.parameters())
    if assign:
        declared = module.state_dict()
        state = {k: v.to(declared[k].dtype) if k in declared else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=assign)


def load_bundle_tensors(bundle: Bundle, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load prefixed ``tensors`` into the bundle's modules (``assign_state``); a mismatch is a one-line
    CheckpointError."""
    for prefix, module in bundle_modules(bundle):
        part = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        try:
            assign_state(module, part)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else "key or shape mismatch"
            raise CheckpointError(
                f"{source}: the {prefix} weights do not fit model {bundle.cfg.name!r} ({first}); "
                "use the same model settings the checkpoint was trained with"
            ) from None


def bundle_meta(bundle: Bundle) -> dict:
    """The JSON metadata that lets ``load_bundle`` rebuild the modules."""
    cfg = bundle.backbone.cfg
    meta = {**bundle.meta, "model": cfg.name, "model_kwargs": dict(cfg.kwargs), "edgekd_version": __version__}
    if bundle.head is not None:
        meta["head"] = {**asdict(bundle.head.spec), "num_classes": bundle.head.num_classes}
    return stamp("bundle", meta)  # a bundle read from an older file is written in this edgekd's format


def save_bundle(path: str | os.PathLike, bundle: Bundle) -> Path:
    """Write the bundle to ``path`` atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(bundle_state_dict(bundle), str(tmp), metadata={"edgekd": json.dumps(bundle_meta(bundle))})
    return path


def read_bundle_meta(path: str | os.PathLike) -> dict:
    """The edgekd metadata of a ``.safetensors`` bundle: the file's header only, no tensor is read."""
    from safetensors import safe_open

    if Path(path).suffix != ".safetensors":
        raise CheckpointError(f"{path} is a plain state_dict; say which architecture it is with --model (e.g. mbf)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get("edgekd")
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}".splitlines()[0]) from None
    if raw_meta is None:
        raise CheckpointError(f"{path} has no edgekd metadata; for raw weights pass the architecture with --model")
    meta = parse_versioned_json("bundle", raw_meta, path)
    _check_complete(meta, path)
    return meta


def checked_bundle_meta(meta: object, source: str | os.PathLike) -> dict:
    """``meta``, a bundle's metadata held in ``source`` (a multi-rank checkpoint's ``state.json``), if this edgekd
    reads its format and it says what ``bundle_from_meta`` needs; a one-line CheckpointError otherwise."""
    check_format("bundle", meta, source)
    _check_complete(meta, source)
    return meta


def _check_complete(meta: dict, source: str | os.PathLike) -> None:
    problem = _missing_in_meta(meta)
    if problem is not None:
        raise CheckpointError(f"{source}: its edgekd metadata {problem}; {FORMATS['bundle'].damaged}")


def _missing_in_meta(meta: dict) -> str | None:
    """What the metadata lacks to rebuild the modules (model name, kwargs, head class count and spec), or None."""
    if not isinstance(meta.get("model"), str):
        return 'names no model (no "model" string)'
    if not isinstance(meta.get("model_kwargs", {}), dict):
        return 'has "model_kwargs" that are not an object'
    if "head" not in meta:
        return None  # a backbone alone
    head = meta["head"]
    if not isinstance(head, dict):
        return 'has a "head" that is not an object'
    classes = head.get("num_classes")
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        return 'gives the head no class count (no "num_classes" whole number)'
    unknown = sorted(set(head) - {"num_classes", *(f.name for f in fields(HeadSpec))})
    if unknown:
        return f"gives the head fields this edgekd does not know ({', '.join(unknown)})"
    return None


def head_spec_of(meta: dict) -> HeadSpec | None:
    """The head spec (kind, s, m) a bundle's metadata records, or None for a bundle without a head."""
    if "head" not in meta:
        return None
    return HeadSpec(**{k: v for k, v in meta["head"].items() if k != "num_classes"})


def load_bundle(
    path: str | os.PathLike,
    model: str | None = None,
    map_location: str = "cpu",
    lazy_head: bool = False,
    model_option: str = "--model",
) -> Bundle:
    """Rebuild a bundle written by ``save_bundle``, or wrap a plain arcface_torch state_dict given ``model``.

    ``lazy_head``: leave the head on the meta device, its tensors unread (their shapes are checked); a class shard
    reads its rows alone from the file (``ClassHead.rows``). For the frozen teacher of a class-sharded run, so that
    no process holds a head of millions of classes. ``model_option``: the command-line option that named ``model``,
    for the message when the file does not fit it.

    Raises:
        CheckpointError: the file is missing, unreadable, or does not fit the model it names.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the .safetensors file a training run wrote")
    if path.suffix != ".safetensors" and model is not None:
        backbone = create_model(model)
        load_arcface_torch_state_dict(backbone, path, option=model_option)
        return Bundle(backbone=backbone.eval(), meta={"source": str(path)})
    from safetensors import safe_open

    meta = read_bundle_meta(path)
    try:
        with safe_open(str(path), framework="pt", device=map_location) as f:
            lazy = {k for k in f.keys() if lazy_head and k.startswith("head.")}
            tensors = {k: f.get_tensor(k) for k in f.keys() if k not in lazy}
            lazy_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in lazy}
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}".splitlines()[0]) from None
    # A student trained with edgekd 0.1.0's side projection (a layer only the teacher-head terms read) carries
    # ``projection.*`` tensors; nothing after training uses them, so they are left unread.
    bundle = bundle_from_meta(meta, head_device="meta")  # the head takes the file's tensors, or stays lazy
    if lazy_head and bundle.head is not None:
        expected = {f"head.{k}": tuple(v.shape) for k, v in bundle.head.state_dict().items()}
        if lazy_shapes != expected:
            raise CheckpointError(
                f"{path}: the head tensors {lazy_shapes} do not fit the head its metadata describes {expected}; "
                "the file is damaged, write it again"
            )
        bundle.head.source = str(path)
        load_bundle_tensors(Bundle(bundle.backbone), tensors, str(path))  # the backbone; the head stays in the file
    else:
        load_bundle_tensors(bundle, tensors, str(path))
    bundle.backbone.eval()
    return bundle


def bundle_from_meta(meta: dict, head_device: str | None = None) -> Bundle:
    """The modules a bundle's metadata (``bundle_meta``) describes, freshly initialized (weights not loaded);
    ``head_device="meta"`` leaves the head without storage (``ClassHead``)."""
    backbone = create_model(meta["model"], **meta.get("model_kwargs", {}))
    head = None
    if "head" in meta:
        head = ClassHead(backbone.embed_dim, meta["head"]["num_classes"], head_spec_of(meta), device=head_device)
    return Bundle(backbone=backbone, head=head, meta=meta)
