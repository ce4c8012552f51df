"""Deterministic data order: which images (and which flips) step ``k`` sees, as a pure function of the seed.

Because the order is computed, not drawn from a running generator, a resumed run sees exactly the batches
the uninterrupted run would have seen, and the teacher cache can be indexed by (image, flip). Under torchrun the
order is the same global one on every rank: ``batch_size`` is the global batch ``N``, step ``k`` is the same ``N``
images whatever the number of ranks, and rank ``r`` of ``W`` reads rows ``[r·N/W, (r+1)·N/W)`` of it.
"""

from __future__ import annotations

import torch

from edgekd.distributed.launch import check_batch_split


class StepOrder:
    """Per-epoch permutations and flips for ``num_items`` images in batches of ``batch_size`` (last partial dropped).

    Args:
        num_items: dataset length.
        batch_size: images per step, over all ranks (the global batch).
        seed: run seed; epoch ``e`` uses generators seeded from ``(seed, e)``.
        flip: draw a random horizontal flip per image and epoch (face training's only augmentation).
        rank, world_size: this process's part of each global batch (see the module doc); 0 of 1 in one process.
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int, flip: bool, rank: int = 0, world_size: int = 1
    ) -> None:
        if num_items < batch_size:
            raise ValueError(f"the dataset has {num_items} images, fewer than one batch of {batch_size}")
        self.num_items, self.batch_size, self.seed, self.flip = num_items, batch_size, seed, flip
        self.rank, self.rows = rank, check_batch_split(batch_size, world_size)
        self.steps_per_epoch = num_items // batch_size
        self._epoch = -1
        self._perm = self._flips = None

    def _load_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_items, generator=gen)
            self._flips = torch.rand(self.num_items, generator=gen) < 0.5
            self._epoch = epoch

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, flips)`` of this rank's rows of step ``step``: int64 (B,) and bool (B,), ``B = N / W``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        self._load_epoch(epoch)
        start = position * self.batch_size + self.rank * self.rows
        indices = self._perm[start : start + self.rows]
        flips = self._flips[indices] if self.flip else torch.zeros(len(indices), dtype=torch.bool)
        return indices, flips


class OrderSampler(torch.utils.data.Sampler):
    """Batch sampler over steps ``start`` .. ``stop`` of a ``StepOrder``, for a DataLoader with workers."""

    def __init__(self, order: StepOrder, start: int, stop: int) -> None:
        self.order, self.start, self.stop = order, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.order.batch(step)[0].tolist()

    def __len__(self) -> int:
        return self.stop - self.start
