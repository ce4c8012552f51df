"""The study's data and evaluation: each plan's datasets loaded once, classification top-1 on a split, and face
verification over every pair of held-out identities (TAR@FAR = 1e-3 / 1e-4 need many impostor pairs: N images of
held-out identities give N·(N−1)/2 pairs from N forward passes, about two million from 2,000 images).
"""

from __future__ import annotations

import numpy as np
import torch

from edgekd.bundle import Bundle
from edgekd.study.grid import DatasetPlan

__all__ = ["StudyData", "evaluate", "verify_identities", "REPORT_FARS"]

REPORT_FARS = (1e-2, 1e-3, 1e-4, 1e-5)
VAL_SEED_OFFSET = 1  # validation identities are the held-out identities of data seed + 1: disjoint from test ones


@torch.no_grad()
def verify_identities(bundle: Bundle, images: torch.Tensor, labels: np.ndarray, device: str = "auto") -> dict:
    """Verification over every pair of ``images`` (uint8 ``(N, C, H, W)``; ``labels (N,)`` their identities).

    TAR@FAR is read off the ROC of all N·(N−1)/2 pairs (as IJB 1:1 protocols use every genuine and impostor
    pair); the 10-fold accuracy uses all genuine pairs and as many impostor pairs drawn with a fixed seed,
    interleaved so each fold is balanced. Embeddings are flip-summed and L2-normalized.
    """
    from edgekd.eval.embed import embed_images
    from edgekd.eval.metrics import flip_sum_normalize, tar_at_far, verification_10fold
    from edgekd.train.loop import resolve_device

    backbone = bundle.backbone.to(resolve_device(device)).eval()
    emb = flip_sum_normalize(embed_images(backbone, images, 256, True, bundle.cfg.mean, bundle.cfg.std))
    a, b = np.triu_indices(len(emb), 1)
    scores = (emb @ emb.T)[a, b]  # via the (N, N) Gram matrix: emb[a] would hold N²/2 rows of D floats
    same = labels[a] == labels[b]
    genuine = np.flatnonzero(same)
    rng = np.random.default_rng(0)
    impostor = rng.choice(np.flatnonzero(~same), size=min(len(genuine), int((~same).sum())), replace=False)
    n = min(len(genuine), len(impostor))
    pairs = np.empty(2 * n, dtype=np.int64)
    pairs[0::2], pairs[1::2] = rng.permutation(genuine)[:n], impostor[:n]
    folds = verification_10fold(emb[a[pairs]], emb[b[pairs]], same[pairs])
    tar = tar_at_far(scores, same, REPORT_FARS)
    out = {
        "accuracy": folds["accuracy"],
        "accuracy_std": folds["std"],
        "genuine": int(same.sum()),
        "impostor": int((~same).sum()),
    }
    out.update({f"tar@{far:g}": tar[far] for far in REPORT_FARS})
    return out


class StudyData:
    """The datasets of one plan, loaded once per study invocation."""

    def __init__(self, plan: DatasetPlan) -> None:
        self.plan = plan
        self._sets: dict[str, object] = {}

    def train(self):
        from edgekd.data import create_dataset

        if "train" not in self._sets:
            self._sets["train"] = create_dataset(self.plan.data, split="train", image_size=self.plan.image_size)
        return self._sets["train"]

    def eval_set(self, split: str):
        """``val`` or ``test``: a Dataset (classification) or ``(images, labels)`` of held-out identities (face)."""
        if split not in self._sets:
            self._sets[split] = self._heldout(split) if self.plan.face else self._classification(split)
        return self._sets[split]

    def _classification(self, split: str):
        from edgekd.data import create_dataset

        ds = create_dataset(self.plan.data, split=split, image_size=self.plan.image_size)
        limit = self.plan.eval_limit
        return torch.utils.data.Subset(ds, range(min(limit, len(ds)))) if limit else ds

    def _heldout(self, split: str):
        from edgekd.data import parse_synthetic_spec
        from edgekd.data.synthetic import SyntheticIdentities

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
    from edgekd.eval.report import classify_bundle

    return classify_bundle(bundle, data, device=device)
