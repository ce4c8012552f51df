"""Datasets and verification pairs: ``create_dataset`` and ``create_pairs`` turn a ``--data`` / ``--pairs`` string
into a dataset yielding ``(image: uint8 (C, H, W), label: int)`` or a ``PairSet``.

Every dataset has ``num_classes``, ``channels``, ``image_size`` and ``fingerprint`` (a short stable hash of the exact
data, used to key on-disk caches). Normalization and flips are applied to batches (``edgekd.data.transforms``).

Specs for ``create_dataset``:

- ``synthetic`` or ``synthetic:key=value,...``: built-in synthetic identities (keys: identities,
  images_per_identity, image_size, seed, difficulty, channels; the pair keys of ``create_pairs`` are accepted and
  ignored so one string serves both).
- ``fmnist`` / ``fashion-mnist``, optionally ``fmnist:/path``: Fashion-MNIST idx files.
- a folder with ``train.rec`` (+ ``train.idx``), a ``.rec`` file, or ``rec:`` and either of them: insightface
  RecordIO.
- any other folder: one subfolder per class; a folder holding only ``train``/``val``/``test`` subfolders is split.

Specs for ``create_pairs``: ``synthetic[:key=value,...]`` (keys: pairs, pair_identities, pair_images, image_size,
seed, difficulty, channels; identities and images_per_identity describe training data and are ignored) or a path to
an insightface verification ``.bin`` file.

``resolve_data`` says what a data spec names without reading it (every reader of ``--data``-style strings, the
calibration sets included, goes through it), ``absolute_spec`` makes the paths of a data or pairs spec absolute,
``bin_files_beside`` finds the ``.bin`` verification sets next to the data and ``check_pairs`` checks a pairs spec
without decoding its images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from edgekd.data.fashion_mnist import FashionMNIST
from edgekd.data.image_folder import ImageFolder
from edgekd.data.pairs import PairSet as PairSet
from edgekd.data.pairs import check_synthetic_pairs, synthetic_pairs
from edgekd.data.recordio import RecordIODataset
from edgekd.data.synthetic import SyntheticIdentities
from edgekd.data.verification_bin import check_bin, load_bin
from edgekd.errors import DataError

__all__ = [
    "DataSource",
    "absolute_spec",
    "bin_files_beside",
    "check_pairs",
    "create_dataset",
    "create_pairs",
    "parse_synthetic_spec",
    "resolve_data",
    "PairSet",
]

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
# arcface_torch's val_targets first, in its order, then the other insightface sets; any other .bin follows by name.
_BIN_ORDER = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw", "cfp_ff", "vgg2_fp")


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


def _split_spec(spec: str) -> tuple[str, str, str | None]:
    """``(kind, prefix, path)`` of a stripped spec: ``synthetic`` (no path), ``fmnist`` (``fmnist:/root`` or no
    path), ``rec`` (``rec:/path``) or ``path``; ``prefix + path`` is the spec again. The one place spellings are
    told apart: ``resolve_data`` and ``absolute_spec`` both read it."""
    if _is_synthetic(spec):
        return "synthetic", spec, None
    head, colon, rest = spec.partition(":")
    if head.lower() in _FMNIST_NAMES:
        return "fmnist", head + colon, rest or None
    if spec.startswith("rec:"):
        return "rec", "rec:", spec[4:]
    return "path", "", spec


@dataclass(frozen=True)
class DataSource:
    """What a data spec names, found without reading the data.

    Attributes:
        kind: ``synthetic``, ``fmnist``, ``recordio`` or ``folder`` (an image folder, split or not).
        spec: the spec, stripped.
        path: the ``.rec`` file (recordio), the folder (folder), the idx-file root (fmnist, None for the default).
    """

    kind: str
    spec: str
    path: Path | None = None


def resolve_data(spec: str) -> DataSource:
    """What ``spec`` names (see the module docstring); a spec that names nothing readable is a one-line error.

    A RecordIO source is named by its ``.rec`` file, whichever of its spellings was used: a folder holding
    ``train.rec``, the ``.rec`` file, or either of them after ``rec:``.
    """
    spec = str(spec).strip()
    if not spec:
        raise DataError("empty data spec; pass synthetic, fmnist, or a folder")
    kind, _, where = _split_spec(spec)
    if kind == "synthetic":
        return DataSource("synthetic", spec)
    if kind == "fmnist":
        return DataSource("fmnist", spec, Path(where).expanduser() if where else None)
    path = Path(where).expanduser()
    if kind == "rec":
        return DataSource("recordio", spec, path / "train.rec" if path.is_dir() else path)
    if path.suffix == ".rec":
        return DataSource("recordio", spec, path)
    if not path.exists():
        raise DataError(f"data {spec!r} is neither a built-in name (synthetic, fmnist) nor an existing folder or file")
    if not path.is_dir():
        raise DataError(
            f"data {spec!r} is a file; pass a folder of class subfolders, a .rec file or a .bin pair file via --pairs"
        )
    if (path / "train.rec").is_file():
        return DataSource("recordio", spec, path / "train.rec")
    return DataSource("folder", spec, path)


def absolute_spec(spec: str | None) -> str | None:
    """``spec`` (a data or pairs spec) with its path made absolute against the working directory, so that it names
    the same files from anywhere (``faces`` -> ``/home/me/faces``, ``rec:d`` -> ``rec:/home/me/d``); built-in names
    and synthetic specs come back as they are. Nothing is read: a path that does not exist stays an error for later.
    """
    if spec is None:
        return None
    spec = str(spec).strip()
    _, prefix, where = _split_spec(spec)
    if not where:
        return spec
    return prefix + os.path.abspath(os.path.expanduser(where))


def bin_files_beside(spec: str) -> list[Path]:
    """The insightface verification sets (``*.bin``) in the folder of the data ``spec`` names: beside ``train.rec``
    for RecordIO, in the top folder of an image folder; empty for built-in data. lfw, cfp_fp, agedb_30 (arcface_torch's
    evaluation) come first, then the other known sets, then any other ``.bin`` by name."""
    source = resolve_data(spec)
    if source.kind not in ("recordio", "folder"):
        return []
    folder = source.path.parent if source.kind == "recordio" else source.path
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.suffix == ".bin" and p.is_file() and not p.name.startswith(".")]
    rank = {name: i for i, name in enumerate(_BIN_ORDER)}
    return sorted(found, key=lambda p: (rank.get(p.stem, len(rank)), p.name))


def _recordio(path: Path, split: str, kw: dict) -> Dataset:
    if split != "train":
        raise DataError(f"RecordIO data {path} has only a train split; evaluate faces with --pairs (.bin or synthetic)")
    if not path.is_file():
        raise DataError(f"RecordIO file {path} does not exist")
    channels = kw.pop("channels", RecordIODataset.channels)
    if channels != RecordIODataset.channels:
        raise DataError(f"RecordIO data {path} holds RGB images; a {channels}-channel model cannot read them")
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
    source = resolve_data(spec)
    spec = source.spec
    if source.kind in ("synthetic", "fmnist"):
        kw.pop("skip_bad", None)  # generated or packaged data has no unreadable file to leave out
    if source.kind == "synthetic":
        opts = {**kw, **parse_synthetic_spec(spec)}
        for key in _PAIR_KEYS:
            opts.pop(key, None)
        return SyntheticIdentities(split=split, **opts)
    if source.kind == "fmnist":
        return FashionMNIST(source.path, split=split, **kw)
    if source.kind == "recordio":
        return _recordio(source.path, split, kw)
    path = source.path
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
        return synthetic_pairs(**{**kw, **_synthetic_pair_options(spec)})
    return load_bin(_bin_path(spec), **kw)


def _synthetic_pair_options(spec: str) -> dict:
    """The ``synthetic_pairs`` arguments a synthetic pairs spec sets (its pair keys under their argument names)."""
    opts = parse_synthetic_spec(spec)
    for key in ("identities", "images_per_identity"):  # these size the training data, not the pairs
        opts.pop(key, None)
    renamed = {"pair_identities": "identities", "pair_images": "images_per_identity"}
    return {renamed.get(k, k): v for k, v in opts.items()}


def check_pairs(spec: str) -> None:
    """Check a ``--pairs`` spec without building its pairs: a synthetic spec's options and that its pairs can be drawn
    (``check_synthetic_pairs``), or a ``.bin`` file that exists, unpickles, has matching counts and a first image that
    decodes (``check_bin``); a one-line error if not."""
    spec = str(spec).strip()
    if _is_synthetic(spec):
        check_synthetic_pairs(**_synthetic_pair_options(spec))
        return
    check_bin(_bin_path(spec))


def _bin_path(spec: str) -> Path:
    """The ``.bin`` file a non-synthetic pairs spec names; it must exist."""
    path = Path(spec).expanduser()
    if path.suffix != ".bin":
        raise DataError(f"pairs {spec!r} are not synthetic[:k=v,...] or an insightface .bin file")
    if not path.is_file():
        raise DataError(f"pair file {path} does not exist")
    return path
