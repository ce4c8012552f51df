"""Deterministic data order: which images (and which flips) step ``k`` sees, as a pure function of the seed.

Because the order is computed, not drawn from a running generator, a resumed run sees exactly the batches
the uninterrupted run would have seen, and the teacher cache can be indexed by (image, flip).
"""

from __future__ import annotations

import torch


class StepOrder:
    """Per-epoch permutations and flips for ``num_items`` images in batches of ``batch_size`` (last partial dropped).

    Args:
        num_items: dataset length.
        batch_size: images per step.
        seed: run seed; epoch ``e`` uses generators seeded from ``(seed, e)``.
        flip: draw a random horizontal flip per image and epoch (face training's only augmentation).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, flip: bool) -> None:
        if num_items < batch_size:
            raise ValueError(f"the dataset has {num_items} images, fewer than one batch of {batch_size}")
        self.num_items, self.batch_size, self.seed, self.flip = num_items, batch_size, seed, flip
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
        """``(indices, flips)`` of step ``step``: int64 (B,) and bool (B,)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        self._load_epoch(epoch)
        indices = self._perm[position * self.batch_size : (position + 1) * self.batch_size]
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
