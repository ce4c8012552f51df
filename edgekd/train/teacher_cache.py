"""On-disk cache of a frozen teacher's embeddings for every training image and its horizontal flip.

Face training augments with flips only, so the teacher sees just two versions of each image: computing them
once and memory-mapping them makes every later epoch (and every SH-KD stage that reuses the teacher) skip
the teacher forward pass. The file name is a key over the teacher's weights, the dataset fingerprint and
the input transform, so a changed teacher or changed data gets a new cache instead of stale embeddings.

Under torchrun the ranks build it together: rank 0's key is every rank's (the data fingerprint reads file sizes and
times, which copies on other nodes need not share), rank 0 creates the table under a temporary name, each rank fills
its own contiguous block of rows, and rank 0 renames it into place once all have flushed theirs; every rank then
memory-maps the file itself (one page cache on a machine, no copy sent between processes).

Beside each table ``teacher_<key>.npy`` lies its info file ``teacher_<key>.json`` (key, teacher, data, size and the
cache's format version, ``edgekd.formats``). It is written before the table is renamed into place, so a table in view
has it; a table without one is of no known format (an edgekd from before formats were versioned wrote the info
second, and a kill could come between; or a user deleted it) and is built again. Opening a cache checks its format
first.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgekd.atomic import TEMP_FILE, atomic_path, file_mode, remove_debris, write_json
from edgekd.data.transforms import hflip, normalize
from edgekd.distributed.launch import ONE_PROCESS, World
from edgekd.errors import EdgekdError
from edgekd.formats import FORMATS, read_versioned_json, stamp
from edgekd.utils.hashing import json_digest, module_fingerprint
from edgekd.utils.progress import progress

# The cache folder is shared by every run on the machine, so a temporary there may belong to a live writer; one
# not written to for this long belongs to a killed one (a writer appends to it continuously until its rename).
STALE_TEMPORARY_S = 15 * 60
# Ranks on several nodes fill and read one cache file: its folder must be one they all see.
SHARED_CACHE_ADVICE = (
    "with several nodes, point EDGEKD_CACHE_DIR at a folder every node sees (a shared filesystem), "
    "or train without the cache (--no-teacher-cache)"
)


def cache_key(teacher: nn.Module, dataset, mean, std) -> str:
    """The cache identity: teacher weights, data fingerprint and the normalization applied to images."""
    return json_digest(
        {"teacher": module_fingerprint(teacher), "data": dataset.fingerprint, "mean": list(mean), "std": list(std)},
        length=20,
    )


class TeacherCache:
    """Teacher embeddings ``(N, 2, D_t)`` float32 (index 0: image, 1: its flip), memory-mapped from ``path``.

    Opening it refuses, in one line, a cache of a format this edgekd does not read or a table it cannot read.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.info = read_versioned_json("teacher_cache", info_path(self.path))
        self.table = _open_table(self.path)

    def lookup(self, indices: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """``z_t: (B, D_t)`` for images ``indices`` flipped where ``flips``."""
        rows = self.table[indices.numpy(), flips.long().numpy()]
        return torch.from_numpy(np.ascontiguousarray(rows))


def _embed_rows(teacher: nn.Module, dataset, mean, std, rows: range, device, batch_size: int, bar):
    """``(image, flip)`` embeddings ``(len(rows), 2, D)`` of images ``rows``, yielded per batch with its offset."""
    for start in range(rows.start, rows.stop, batch_size):
        items = [dataset[i] for i in range(start, min(rows.stop, start + batch_size))]
        x = normalize(torch.stack([img for img, _ in items]).to(device), mean, std)
        z = teacher(x).float().cpu().numpy()
        z_flip = teacher(hflip(x)).float().cpu().numpy()
        bar.update(len(items))
        yield start, np.stack([z, z_flip], axis=1)


@torch.no_grad()
def build_teacher_cache(
    teacher: nn.Module,
    dataset,
    mean,
    std,
    cache_dir: Path,
    device: torch.device,
    batch_size: int = 128,
    world: World = ONE_PROCESS,
) -> TeacherCache:
    """Return the cache for (teacher, dataset), computing and writing it atomically if it does not exist yet.

    ``world``: the ranks that build it together (default: this process alone).
    """
    if world.distributed:
        return _build_together(teacher, dataset, mean, std, Path(cache_dir), device, batch_size, world)
    cache_dir = Path(cache_dir)
    remove_debris(cache_dir, TEMP_FILE, min_age_s=STALE_TEMPORARY_S)
    key = cache_key(teacher, dataset, mean, std)
    path = cache_dir / f"teacher_{key}.npy"
    if is_complete(path):
        return TeacherCache(path)
    teacher.eval()
    n = len(dataset)
    table = None
    bar = progress(total=n, desc="teacher cache", unit="img")
    for start, rows in _embed_rows(teacher, dataset, mean, std, range(n), device, batch_size, bar):
        if table is None:
            table = np.empty((n, 2, rows.shape[2]), dtype=np.float32)
        table[start : start + len(rows)] = rows
    bar.close()
    _write_info(path, key, teacher, dataset, n, int(table.shape[2]))  # before the table: see the module doc
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, table)
    return TeacherCache(path)


def info_path(path: Path) -> Path:
    """The info file beside the cache table ``path``."""
    return Path(path).with_suffix(".json")


def is_complete(path: Path) -> bool:
    """Whether the cache table ``path`` is in place with its info file (see the module doc)."""
    return Path(path).is_file() and info_path(path).is_file()


def _open_table(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:  # a truncated or overwritten table
        damaged = FORMATS["teacher_cache"].damaged
        raise EdgekdError(
            f"{path}: not a readable teacher-embedding cache ({str(exc).splitlines()[0]}); {damaged}"
        ) from None


def _write_info(path: Path, key: str, teacher: nn.Module, dataset, n: int, dim: int) -> None:
    info = {"key": key, "teacher": module_fingerprint(teacher), "data": dataset.fingerprint, "images": n, "dim": dim}
    write_json(info_path(path), stamp("teacher_cache", info))


def _build_together(teacher, dataset, mean, std, cache_dir: Path, device, batch_size: int, world: World):
    """``build_teacher_cache`` by every rank of ``world``: see the module doc."""
    if world.is_main:
        remove_debris(cache_dir, TEMP_FILE, min_age_s=STALE_TEMPORARY_S)
    key = world.decide(lambda: cache_key(teacher, dataset, mean, std))
    path = cache_dir / f"teacher_{key}.npy"
    if world.decide(lambda: is_complete(path)):
        world.check_visible(path, SHARED_CACHE_ADVICE)
        return TeacherCache(path)
    teacher.eval()
    n = len(dataset)
    tmp = None
    if world.is_main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=cache_dir)  # TEMP_FILE's pattern
        os.close(fd)
        x = normalize(dataset[0][0][None].to(device), mean, std)
        dim = int(teacher(x).shape[1])
        np.lib.format.open_memmap(name, mode="w+", dtype=np.float32, shape=(n, 2, dim)).flush()
        tmp = Path(name)
    tmp = world.broadcast(tmp)
    try:
        world.check_visible(tmp, SHARED_CACHE_ADVICE)
        table = np.load(tmp, mmap_mode="r+")
        lo, hi = n * world.rank // world.size, n * (world.rank + 1) // world.size
        bar = progress(total=hi - lo, desc="teacher cache", unit="img", disable=not world.is_main)
        for start, rows in _embed_rows(teacher, dataset, mean, std, range(lo, hi), device, batch_size, bar):
            table[start : start + len(rows)] = rows
        bar.close()
        table.flush()
        del table
        world.barrier()  # every rank's rows are on disk
        if world.is_main:
            _write_info(path, key, teacher, dataset, n, dim)  # before the table: see the module doc
            os.chmod(tmp, file_mode())
            os.replace(tmp, path)
        world.barrier()  # the file is in place before any rank opens it
    finally:
        if world.is_main and tmp.exists():
            tmp.unlink()
    return TeacherCache(path)
