"""The study's data and evaluation: each plan's datasets loaded once, classification top-1 on a split, and face
verification over every pair of held-out identities (``edgekd.eval.metrics.verification_all_pairs``: TAR@FAR =
1e-3 / 1e-4 need many impostor pairs, and N images of held-out identities give N·(N−1)/2 of them).
"""

from __future__ import annotations

import numpy as np
import torch

from edgekd.bundle import Bundle
from edgekd.data import create_dataset, parse_synthetic_spec
from edgekd.data.synthetic import SyntheticIdentities
from edgekd.eval.embed import embed_images
from edgekd.eval.metrics import flip_sum_normalize, verification_all_pairs
from edgekd.eval.report import classify_bundle
from edgekd.study.grid import DatasetPlan
from edgekd.utils.device import resolve_device

__all__ = ["StudyData", "evaluate", "verify_identities", "STUDY_FARS"]

# The FARs every face cell records (results.json ``tar@<far>``); REPRODUCTION.md reports 1e-3 and 1e-4 of them.
STUDY_FARS = (1e-2, 1e-3, 1e-4, 1e-5)
VAL_SEED_OFFSET = 1  # validation identities are the held-out identities of data seed + 1: disjoint from test ones


@torch.no_grad()
def verify_identities(bundle: Bundle, images: torch.Tensor, labels: np.ndarray, device: str = "auto") -> dict:
    """``verification_all_pairs`` of the flip-summed, L2-normalized embeddings of ``images`` (uint8
    ``(N, C, H, W)``; ``labels (N,)`` their identities), as the study's results record it."""
    backbone = bundle.backbone.to(resolve_device(device)).eval()
    emb = flip_sum_normalize(embed_images(backbone, images, 256, True, bundle.cfg.mean, bundle.cfg.std))
    result = verification_all_pairs(emb, labels, STUDY_FARS)
    out = {
        "accuracy": result["accuracy"],
        "accuracy_std": result["std"],
        "genuine": result["genuine"],
        "impostor": result["impostor"],
    }
    out.update({f"tar@{far:g}": result["tar_at_far"][far] for far in STUDY_FARS})
    return out


class StudyData:
    """The datasets of one plan, loaded once per study invocation."""

    def __init__(self, plan: DatasetPlan) -> None:
        self.plan = plan
        self._sets: dict[str, object] = {}

    def train(self):
        if "train" not in self._sets:
            self._sets["train"] = create_dataset(self.plan.data, split="train", image_size=self.plan.image_size)
        return self._sets["train"]

    def eval_set(self, split: str):
        """``val`` or ``test``: a Dataset (classification) or ``(images, labels)`` of held-out identities (face)."""
        if split not in self._sets:
            self._sets[split] = self._heldout(split) if self.plan.face else self._classification(split)
        return self._sets[split]

    def _classification(self, split: str):
        ds = create_dataset(self.plan.data, split=split, image_size=self.plan.image_size)
        limit = self.plan.eval_limit
        return torch.utils.data.Subset(ds, range(min(limit, len(ds)))) if limit else ds

    def _heldout(self, split: str):
        opts = {k: v for k, v in parse_synthetic_spec(self.plan.data).items() if not k.startswith("pair")}
        opts.setdefault("image_size", self.plan.image_size or 112)
        identities, per_identity = self.plan.verify_val if split == "val" else self.plan.verify_test
        seed = opts.pop("seed", 0) + (VAL_SEED_OFFSET if split == "val" else 0)
        opts.update(identities=identities, images_per_identity=per_identity)
        ds = SyntheticIdentities(**opts, seed=seed, split="heldout")
        return ds.tensor(), ds.labels.numpy()


def evaluate(bundle: Bundle, plan: DatasetPlan, data, device: str) -> dict:
    """Top-1 of the bundle's own head (classification) or ``verify_identities`` (face), on ``StudyData.eval_set``."""
    if plan.face:
        images, labels = data
        return verify_identities(bundle, images, labels, device)
    return classify_bundle(bundle, data, device=device)
