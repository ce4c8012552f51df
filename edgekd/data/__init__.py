"""Datasets and verification pairs: ``create_dataset`` and ``create_pairs`` turn a ``--data`` / ``--pairs`` string
into a dataset yielding ``(image: uint8 (C, H, W), label: int)`` or a ``PairSet``.

Every dataset has ``num_classes``, ``channels``, ``image_size`` and ``fingerprint`` (a short stable hash of the exact
data, used to key on-disk caches). Normalization and flips are applied to batches (``edgekd.data.transforms``).

Specs for ``create_dataset``:

- ``synthetic`` or ``synthetic:key=value,...``: built-in synthetic identities (keys: identities,
  images_per_identity, image_size, seed, difficulty, channels; the pair keys of ``create_pairs`` are accepted and
  ignored so one string serves both).
- ``fmnist`` / ``fashion-mnist``, optionally ``fmnist:/path``: Fashion-MNIST idx files.
- a folder with ``train.rec`` (+ ``train.idx``), a ``.rec`` file, or ``rec:/path``: insightface RecordIO.
- any other folder: one subfolder per class; a folder holding only ``train``/``val``/``test`` subfolders is split.

Specs for ``create_pairs``: ``synthetic[:key=value,...]`` (keys: pairs, pair_identities, pair_images, image_size,
seed, difficulty, channels; identities and images_per_identity describe training data and are ignored) or a path to
an insightface verification ``.bin`` file.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from edgekd.data.fashion_mnist import FashionMNIST
from edgekd.data.image_folder import ImageFolder
from edgekd.data.pairs import PairSet as PairSet
from edgekd.data.pairs import synthetic_pairs
from edgekd.data.recordio import RecordIODataset
from edgekd.data.synthetic import SyntheticIdentities
from edgekd.data.verification_bin import load_bin
from edgekd.errors import DataError

__all__ = ["create_dataset", "create_pairs", "parse_synthetic_spec", "PairSet"]

_SYNTHETIC_KEYS = {
    "identities": int,
    "images_per_identity": int,
    "image_size": int,
    "seed": int,
    "difficulty": float,
    "channels": int,
}
_PAIR_KEYS = {"pairs": int, "pair_identities": int, "pair_images": int}
_FMNIST_NAMES = ("fmnist", "fashion-mnist", "fashion_mnist")
_SPLIT_DIRS = {"train", "val", "test"}


def parse_synthetic_spec(spec: str) -> dict:
    """``"synthetic:identities=200,image_size=64"`` -> ``{"identities": 200, "image_size": 64}``."""
    _, _, rest = spec.partition(":")
    out: dict = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        kind = _SYNTHETIC_KEYS.get(key) or _PAIR_KEYS.get(key)
        if not eq or kind is None:
            known = ", ".join([*_SYNTHETIC_KEYS, *_PAIR_KEYS])
            raise DataError(f"bad synthetic option {item!r}; use synthetic:key=value,... with keys {known}")
        try:
            out[key] = kind(float(value)) if kind is int and float(value).is_integer() else kind(value)
        except ValueError:
            raise DataError(f"synthetic option {key}={value!r} is not a valid {kind.__name__}") from None
    return out


def _is_synthetic(spec: str) -> bool:
    return spec == "synthetic" or spec.startswith("synthetic:")


def _fmnist_root(spec: str) -> str | None:
    """The path of ``fmnist:/path`` (None for bare ``fmnist``)."""
    return spec.partition(":")[2] or None


def _recordio(path: Path, split: str, kw: dict) -> Dataset:
    if split != "train":
        raise DataError(f"RecordIO data {path} has only a train split; evaluate faces with --pairs (.bin or synthetic)")
    if not path.is_file():
        raise DataError(f"RecordIO file {path} does not exist")

    return RecordIODataset(path, **kw)


def create_dataset(spec: str, split: str = "train", **kw) -> Dataset:
    """Build the dataset a ``--data`` string names (see the module docstring); ``None`` keyword values are dropped.

    Args:
        spec: ``synthetic[:k=v,...]``, ``fmnist[:/path]``, a folder, a ``.rec`` file or ``rec:/path``.
        split: ``train``, ``val`` or ``test`` (synthetic also ``heldout``).
        **kw: passed to the dataset class (e.g. ``image_size``, ``channels``, ``skip_bad``, ``val_size``); options
            written in a synthetic spec win over these.

    Returns:
        A Dataset yielding ``(uint8 (C, H, W), int)`` with ``num_classes``, ``channels``, ``image_size``,
        ``fingerprint``.
    """
    kw = {k: v for k, v in kw.items() if v is not None}
    spec = str(spec).strip()
    if not spec:
        raise DataError("empty data spec; pass synthetic, fmnist, or a folder")
    if _is_synthetic(spec):
        opts = {**kw, **parse_synthetic_spec(spec)}
        for key in _PAIR_KEYS:
            opts.pop(key, None)
        return SyntheticIdentities(split=split, **opts)
    if spec.split(":", 1)[0].lower() in _FMNIST_NAMES:
        return FashionMNIST(_fmnist_root(spec), split=split, **kw)
    if spec.startswith("rec:"):
        return _recordio(Path(spec[4:]).expanduser(), split, kw)
    path = Path(spec).expanduser()
    if path.suffix == ".rec":
        return _recordio(path, split, kw)
    if not path.exists():
        raise DataError(f"data {spec!r} is neither a built-in name (synthetic, fmnist) nor an existing folder or file")
    if not path.is_dir():
        raise DataError(
            f"data {spec!r} is a file; pass a folder of class subfolders, a .rec file or a .bin pair file via --pairs"
        )
    if (path / "train.rec").is_file():
        return _recordio(path / "train.rec", split, kw)

    subdirs = {d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")}
    if subdirs and subdirs <= _SPLIT_DIRS:
        if split not in subdirs:
            raise DataError(f"folder {path} has no {split!r} subfolder (it has {', '.join(sorted(subdirs))})")
        return ImageFolder(path / split, **kw)
    if split != "train":
        raise DataError(
            f"folder {path} has no {split} split; lay it out as {path}/train/<class>/ and {path}/{split}/<class>/"
        )
    return ImageFolder(path, **kw)


def create_pairs(spec: str, **kw) -> PairSet:
    """Build the verification pairs a ``--pairs`` string names: ``synthetic[:k=v,...]`` or a ``.bin`` file.

    Args:
        spec: see the module docstring.
        **kw: ``synthetic_pairs`` arguments (``pairs``, ``identities``, ``images_per_identity``, ``image_size``,
            ``seed``, ``difficulty``, ``channels``) or ``load_bin`` arguments; ``None`` values are dropped.
            Options written in the spec win.

    Returns:
        A ``PairSet``.
    """
    kw = {k: v for k, v in kw.items() if v is not None}
    spec = str(spec).strip()
    if _is_synthetic(spec):
        opts = parse_synthetic_spec(spec)
        for key in ("identities", "images_per_identity"):  # these size the training data, not the pairs
            opts.pop(key, None)
        renamed = {"pair_identities": "identities", "pair_images": "images_per_identity"}
        opts = {renamed.get(k, k): v for k, v in opts.items()}
        return synthetic_pairs(**{**kw, **opts})
    path = Path(spec).expanduser()
    if path.suffix == ".bin":
        if not path.is_file():
            raise DataError(f"pair file {path} does not exist")

        return load_bin(path, **kw)
    raise DataError(f"pairs {spec!r} are not synthetic[:k=v,...] or an insightface .bin file")
