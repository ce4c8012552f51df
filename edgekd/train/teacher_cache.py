"""On-disk cache of a frozen teacher's embeddings for every training image and its horizontal flip.

Face training augments with flips only, so the teacher sees just two versions of each image: computing them
once and memory-mapping them makes every later epoch (and every SH-KD stage that reuses the teacher) skip
the teacher forward pass. The file name is a key over the teacher's weights, the dataset fingerprint and
the input transform, so a changed teacher or changed data gets a new cache instead of stale embeddings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgekd.atomic import TEMP_FILE, atomic_path, remove_debris, write_json
from edgekd.data.transforms import hflip, normalize
from edgekd.utils.hashing import json_digest, module_fingerprint
from edgekd.utils.progress import progress

# The cache folder is shared by every run on the machine, so a temporary there may belong to a live writer; one
# not written to for this long belongs to a killed one (a writer appends to it continuously until its rename).
STALE_TEMPORARY_S = 15 * 60


def cache_key(teacher: nn.Module, dataset, mean, std) -> str:
    """The cache identity: teacher weights, data fingerprint and the normalization applied to images."""
    return json_digest(
        {"teacher": module_fingerprint(teacher), "data": dataset.fingerprint, "mean": list(mean), "std": list(std)},
        length=20,
    )


class TeacherCache:
    """Teacher embeddings ``(N, 2, D_t)`` float32 (index 0: image, 1: its flip), memory-mapped from ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.table = np.load(self.path, mmap_mode="r")

    def lookup(self, indices: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """``z_t: (B, D_t)`` for images ``indices`` flipped where ``flips``."""
        rows = self.table[indices.numpy(), flips.long().numpy()]
        return torch.from_numpy(np.ascontiguousarray(rows))


@torch.no_grad()
def build_teacher_cache(
    teacher: nn.Module, dataset, mean, std, cache_dir: Path, device: torch.device, batch_size: int = 128
) -> TeacherCache:
    """Return the cache for (teacher, dataset), computing and writing it atomically if it does not exist yet."""
    cache_dir = Path(cache_dir)
    remove_debris(cache_dir, TEMP_FILE, min_age_s=STALE_TEMPORARY_S)
    key = cache_key(teacher, dataset, mean, std)
    path = cache_dir / f"teacher_{key}.npy"
    if path.is_file():
        return TeacherCache(path)
    teacher.eval()
    n = len(dataset)
    table = None
    bar = progress(total=n, desc="teacher cache", unit="img")
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        x = normalize(torch.stack([img for img, _ in items]).to(device), mean, std)
        z = teacher(x).float().cpu()
        z_flip = teacher(hflip(x)).float().cpu()
        if table is None:
            table = np.empty((n, 2, z.shape[1]), dtype=np.float32)
        table[start : start + len(items), 0] = z.numpy()
        table[start : start + len(items), 1] = z_flip.numpy()
        bar.update(len(items))
    bar.close()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, table)
    write_json(
        path.with_suffix(".json"),
        {
            "key": key,
            "teacher": module_fingerprint(teacher),
            "data": dataset.fingerprint,
            "images": n,
            "dim": int(table.shape[2]),
        },
    )
    return TeacherCache(path)
