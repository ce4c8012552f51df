"""Verification pair sets: ``PairSet`` (images 2i and 2i+1 form pair i, as in insightface ``.bin`` files).

``synthetic_pairs`` builds a balanced, deterministic pair set from held-out synthetic identities, which are disjoint
from every training identity of the same seed.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from edgekd.data.synthetic import SyntheticIdentities
from edgekd.errors import DataError
from edgekd.utils.hashing import content_digest

__all__ = ["PairSet", "check_synthetic_pairs", "synthetic_pairs"]


@dataclass
class PairSet:
    """A verification set of ``P`` pairs.

    Attributes:
        images: ``2P`` images, uint8 ``(2P, C, H, W)`` or a Dataset whose item ``j`` is image ``j`` (a bare
            tensor or an ``(image, label)`` tuple); pair ``i`` is images ``2i`` and ``2i + 1``.
        issame: bool ``(P,)``, True for a genuine pair (same identity).
        name: short name used in reports (``lfw``, ``synthetic``).
        fingerprint: stable hash of the exact pairs, for caches ('' when unknown).
    """

    images: torch.Tensor | Dataset
    issame: np.ndarray
    name: str = "pairs"
    fingerprint: str = ""

    def __post_init__(self) -> None:
        self.issame = np.asarray(self.issame, dtype=bool).reshape(-1)
        if len(self.images) != 2 * len(self.issame):
            raise DataError(
                f"pair set {self.name!r} has {len(self.images)} images for {len(self.issame)} pairs; "
                "it needs exactly two images per pair"
            )
        if len(self.issame) == 0:
            raise DataError(f"pair set {self.name!r} is empty")

    def __len__(self) -> int:
        return len(self.issame)

    @property
    def num_genuine(self) -> int:
        """Number of same-identity pairs."""
        return int(self.issame.sum())


def _genuine_count(pairs: int) -> int:
    """The genuine pairs of a balanced set of ``pairs``: half, rounded up."""
    return (pairs + 1) // 2


def _distinct_pairs(identities: int, per_identity: int, genuine: bool) -> int:
    """How many distinct unordered image pairs exist: of one identity (``genuine``) or of two different ones."""
    if genuine:
        return identities * (per_identity * (per_identity - 1) // 2)
    return identities * (identities - 1) // 2 * per_identity * per_identity


def _check_counts(pairs: int, identities: int, per_identity: int) -> None:
    """A one-line error when ``pairs`` distinct pairs, half genuine, cannot be drawn from the identities."""
    if pairs < 2 or identities < 2 or per_identity < 2:
        raise DataError("synthetic pairs need pairs >= 2, identities >= 2 and images_per_identity >= 2")
    n_gen = _genuine_count(pairs)
    for genuine, count in ((True, n_gen), (False, pairs - n_gen)):
        total = _distinct_pairs(identities, per_identity, genuine)
        if count > total:
            raise DataError(
                f"cannot draw {count} distinct {'genuine' if genuine else 'impostor'} pairs from {identities} "
                f"identities x {per_identity} images ({total} exist); raise identities or images_per_identity "
                "(pair_identities, pair_images in a synthetic: pairs spec) or lower pairs"
            )


def check_synthetic_pairs(**kw) -> None:
    """What ``synthetic_pairs(**kw)`` would refuse in its counts (its defaults for what ``kw`` leaves out), checked
    without rendering an image: a run checks its pair sets so before it trains."""
    args = inspect.signature(synthetic_pairs).bind(**kw)
    args.apply_defaults()
    _check_counts(args.arguments["pairs"], args.arguments["identities"], args.arguments["images_per_identity"])


def _sample_pairs(rng: np.random.Generator, identities: int, per_identity: int, count: int, genuine: bool) -> set:
    """Distinct unordered pairs of image indices, same identity (``genuine``) or different identities; ``count``
    must not exceed ``_distinct_pairs`` (``_check_counts``), or this would never end."""
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < count:
        need = count - len(chosen)
        a_id = rng.integers(identities, size=2 * need)
        b_id = a_id if genuine else (a_id + rng.integers(1, max(identities, 2), size=2 * need)) % identities
        a = a_id * per_identity + rng.integers(per_identity, size=2 * need)
        b = b_id * per_identity + rng.integers(per_identity, size=2 * need)
        for i, j in zip(a.tolist(), b.tolist(), strict=True):
            if i != j and len(chosen) < count:
                chosen.add((min(i, j), max(i, j)))
    return chosen


def synthetic_pairs(
    pairs: int = 1000,
    identities: int = 100,
    images_per_identity: int = 10,
    image_size: int = 112,
    seed: int = 0,
    difficulty: float = 1.0,
    channels: int = 3,
) -> PairSet:
    """Balanced verification pairs over held-out synthetic identities (split ``heldout``).

    Genuine and impostor pairs alternate (genuine first), so every contiguous fold of the 10-fold protocol is
    balanced when ``pairs`` is a multiple of 20. Pairs are distinct; images may appear in several pairs, as in LFW.

    Args:
        pairs: number of pairs ``P`` (half genuine, rounded up).
        identities: held-out identities drawn from.
        images_per_identity: images rendered per held-out identity.
        image_size: side in pixels.
        seed: the synthetic seed; use the training seed so the identities are disjoint from training.
        difficulty: nuisance strength (see ``SyntheticIdentities``).
        channels: 3 or 1.

    Returns:
        A ``PairSet`` with uint8 images ``(2P, C, S, S)``.
    """
    _check_counts(pairs, identities, images_per_identity)
    ds = SyntheticIdentities(identities, images_per_identity, image_size, seed, "heldout", difficulty, channels)
    rng = np.random.default_rng([seed, 7, pairs])
    n_gen = _genuine_count(pairs)
    gen = sorted(_sample_pairs(rng, identities, images_per_identity, n_gen, True))
    imp = sorted(_sample_pairs(rng, identities, images_per_identity, pairs - n_gen, False))
    gen = [gen[i] for i in rng.permutation(len(gen))]
    imp = [imp[i] for i in rng.permutation(len(imp))]
    order, issame = [], []
    for k in range(pairs):
        genuine = k % 2 == 0
        pair = gen.pop() if genuine else imp.pop()
        flip = rng.random() < 0.5  # random order within a pair
        order.extend(pair[::-1] if flip else pair)
        issame.append(genuine)
    images = ds.tensor()[torch.as_tensor(order)]
    fp = content_digest(json.dumps({"data": ds.fingerprint, "pairs": pairs}), algorithm="sha1")
    return PairSet(images=images, issame=np.array(issame), name="synthetic", fingerprint=fp)
