"""Pair sets reuse images: evaluate_pairs embeds each distinct image once (issue 25: the INT8 task gate embedded
3,000 synthetic pairs' 6,000 slots, drawn from ~1,000 images, through both models, with flips)."""

from __future__ import annotations

import numpy as np
import torch

from edgekd.data import create_pairs
from edgekd.eval.embed import distinct_images, evaluate_pairs


def test_distinct_images_rebuild_every_slot():
    pairs = create_pairs("synthetic:pairs=400,pair_identities=20,pair_images=5,image_size=16")
    unique, slot = distinct_images(pairs.images)
    assert len(unique) <= 20 * 5 < len(pairs.images)
    assert torch.equal(unique[torch.from_numpy(slot)], pairs.images)  # uint8 copies: exact
    assert len({bytes(u.numpy().tobytes()) for u in unique}) == len(unique)  # no image twice


def test_evaluate_pairs_embeds_each_distinct_image_once_per_view():
    pairs = create_pairs("synthetic:pairs=400,pair_identities=20,pair_images=5,image_size=16")
    seen = []

    def forward(x):
        seen.append(len(x))
        return x.flatten(1)[:, :8].float()

    result = evaluate_pairs(forward, pairs, flip=True, batch_size=64)
    distinct = len(distinct_images(pairs.images)[0])
    assert sum(seen) == 2 * distinct  # the image and its mirror, once each
    assert 0.0 <= result["accuracy"] <= 1.0 and result["impostors"] == 200
    np.testing.assert_array_equal(result["fpr"], np.sort(result["fpr"]))
