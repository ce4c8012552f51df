"""IJB-B / IJB-C 1:1 verification: the protocol files and the aligned face crops (reference/face.md §4.3).

The standard folder (``IJBC/`` or ``IJBB/``) holds ``loose_crop/*.jpg`` and ``meta/`` with
``<p>_face_tid_mid.txt`` (``image template_id media_id``), ``<p>_name_5pts_score.txt`` (``image x1 y1 .. x5 y5
faceness``) and ``<p>_template_pair_label.txt`` (``tid1 tid2 label``), where ``<p>`` is ``ijbc`` or ``ijbb``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from edgekd.data.align import align_face
from edgekd.data.image_bytes import to_8bit
from edgekd.errors import DataError
from edgekd.utils.hashing import content_digest

__all__ = ["IJBProtocol", "IJBImages", "load_ijb", "PREFIXES"]

PREFIXES = ("ijbc", "ijbb")


@dataclass
class IJBProtocol:
    """One IJB 1:1 protocol.

    Attributes:
        name: ``IJBC`` or ``IJBB``.
        root: the dataset folder.
        images: ``N`` crop file names under ``root/loose_crop``, in landmark-file order.
        templates: template id of each image, int64 ``(N,)``.
        medias: media id of each image, int64 ``(N,)``.
        landmarks: five landmarks per image in crop pixels, float32 ``(N, 5, 2)``.
        faceness: detector score per image, float32 ``(N,)``.
        pairs: template id pairs, int64 ``(P, 2)``.
        labels: 1 for a genuine pair, int64 ``(P,)``.
    """

    name: str
    root: Path
    images: list[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    faceness: np.ndarray
    pairs: np.ndarray
    labels: np.ndarray

    @property
    def image_dir(self) -> Path:
        return self.root / "loose_crop"

    def fingerprint(self) -> str:
        """Hash of the images, landmarks, templates and medias (what the embeddings depend on)."""
        arrays = (self.landmarks, self.faceness, self.templates, self.medias)
        return content_digest("\n".join(self.images), (np.ascontiguousarray(a).tobytes() for a in arrays))


def _find_prefix(meta: Path, prefix: str | None) -> str:
    candidates = [prefix.lower()] if prefix else list(PREFIXES)
    for p in candidates:
        if (meta / f"{p}_face_tid_mid.txt").is_file():
            return p
    names = " or ".join(f"{p}_face_tid_mid.txt" for p in candidates)
    raise DataError(f"IJB folder: {meta} has no {names} (give the IJBC/ or IJBB/ folder holding meta/ and loose_crop/)")


def _rows(path: Path, ncols: int) -> list[list[str]]:
    if not path.is_file():
        raise DataError(f"IJB protocol file {path} not found")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != ncols:
                raise DataError(f"{path}: line {n} has {len(parts)} fields, expected {ncols}")
            rows.append(parts)
    if not rows:
        raise DataError(f"{path}: the file is empty")
    return rows


def _numbers(path: Path, rows: list[list[str]], cols: slice, dtype) -> np.ndarray:
    try:
        return np.array([r[cols] for r in rows], dtype=dtype)
    except ValueError as exc:
        raise DataError(f"{path}: non-numeric field ({exc})") from None


def _read_pairs(path: Path) -> np.ndarray:
    """``tid1 tid2 label`` rows as int64 ``(P, 3)``; parsed in C, since IJB-C has 15.7 M lines."""
    if not path.is_file():
        raise DataError(f"IJB protocol file {path} not found")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
            flat = np.fromstring(path.read_bytes().decode("ascii", "replace"), dtype=np.int64, sep=" ")
        except (DeprecationWarning, ValueError):
            flat = None
    if flat is None or len(flat) == 0 or len(flat) % 3:
        raise DataError(f"{path}: expected lines of three integers 'template1 template2 label'")
    return flat.reshape(-1, 3)


def load_ijb(root: str | os.PathLike, prefix: str | None = None) -> IJBProtocol:
    """Read an IJB-B/C folder's protocol files.

    Args:
        root: the folder with ``meta/`` and ``loose_crop/``.
        prefix: ``ijbc`` or ``ijbb``; found from the file names when not given.
    """
    root = Path(root)
    meta = root / "meta"
    prefix = _find_prefix(meta, prefix)
    tid_path = meta / f"{prefix}_face_tid_mid.txt"
    lmk_path = meta / f"{prefix}_name_5pts_score.txt"
    tid_rows, lmk_rows = _rows(tid_path, 3), _rows(lmk_path, 12)
    images = [r[0] for r in lmk_rows]
    tid_names = [r[0] for r in tid_rows]
    if tid_names != images:
        pos = {name: i for i, name in enumerate(tid_names)}
        missing = [name for name in images if name not in pos]
        if missing or len(pos) != len(images):
            first = missing[0] if missing else "(different image count)"
            raise DataError(f"{lmk_path} and {tid_path} list different images, e.g. {first}")
        tid_rows = [tid_rows[pos[name]] for name in images]
    templates = _numbers(tid_path, tid_rows, slice(1, 2), np.int64).ravel()
    medias = _numbers(tid_path, tid_rows, slice(2, 3), np.int64).ravel()
    points = _numbers(lmk_path, lmk_rows, slice(1, 12), np.float32)
    table = _read_pairs(meta / f"{prefix}_template_pair_label.txt")
    return IJBProtocol(prefix.upper(), root, images, templates, medias, points[:, :10].reshape(-1, 5, 2),
                       points[:, 10].copy(), table[:, :2].copy(), table[:, 2].copy())  # fmt: skip


class IJBImages(Dataset):
    """The protocol's crops aligned to the ArcFace template: item ``i`` is uint8 RGB ``(3, S, S)``.

    Args:
        protocol: from ``load_ijb``.
        image_size: side ``S`` of the aligned crop (112 for ArcFace models).
    """

    def __init__(self, protocol: IJBProtocol, image_size: int = 112) -> None:
        self.protocol, self.image_size = protocol, int(image_size)

    def __len__(self) -> int:
        return len(self.protocol.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.protocol.image_dir / self.protocol.images[index]
        try:
            with Image.open(path) as img:
                rgb = to_8bit(img)
        except FileNotFoundError:
            raise DataError(f"IJB image {path} (image {index}) not found") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: image {index}: cannot decode ({str(exc).splitlines()[0]})") from None
        aligned = align_face(rgb, self.protocol.landmarks[index], self.image_size)
        return torch.from_numpy(aligned).permute(2, 0, 1).contiguous()
