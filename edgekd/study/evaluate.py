"""The study's data and evaluation.

Data: a fixed random subset of the Fashion-MNIST training split (``TrainSubset``; the 5,000-image validation split
is carved out of the training set first, so no model ever trains on it) and the ``val`` / ``test`` splits as
tensors.

Evaluation of a student: top-1 of its own head (``top1``), of the frozen teacher head read on its embedding
(``top1_th``: how well the teacher's classifier reads the student's representation) and, for the TH-KD paper row,
of the paper's combined prediction p′ = (1 − α)·p_s + α·p_th (``top1_pprime``,
``edgekd.eval.metrics.combined_prediction``). ``val_curve`` evaluates a run's per-epoch checkpoints on ``val``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgekd.bundle import Bundle, load_bundle
from edgekd.data import create_dataset, create_pairs
from edgekd.data.pairs import PairSet
from edgekd.data.transforms import normalize
from edgekd.eval.metrics import combined_prediction, top1_accuracy
from edgekd.eval.report import verify_bundle
from edgekd.heads import ClassHead
from edgekd.train.checkpoint import CHECKPOINT_NAME, checkpoint_folders
from edgekd.utils.device import resolve_device
from edgekd.utils.hashing import content_digest

__all__ = ["TrainSubset", "StudyData", "logits", "evaluate_student", "evaluate_teacher", "val_curve", "verify_pairs"]

SUBSET_SEED = 12345  # the training subset is the same for every seed and row


class TrainSubset(torch.utils.data.Dataset):
    """``n`` images of ``dataset`` drawn by a seeded permutation (kept in their original order); None keeps all."""

    def __init__(self, dataset, n: int | None, seed: int = SUBSET_SEED) -> None:
        total = len(dataset)
        if n is None or n >= total:
            index = np.arange(total)
        else:
            index = np.sort(np.random.default_rng(seed).permutation(total)[:n])
        self.images = _images(dataset)[torch.from_numpy(index)]
        self.labels = dataset.labels[torch.from_numpy(index)]
        self.num_classes, self.image_size, self.channels = dataset.num_classes, dataset.image_size, dataset.channels
        self.classes = getattr(dataset, "classes", None)
        self.fingerprint = content_digest(dataset.fingerprint, f"subset:{len(index)}:{seed}", algorithm="sha1")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def _images(dataset) -> torch.Tensor:
    """All images of an in-memory dataset, uint8 ``(N, C, H, W)`` (Fashion-MNIST's tensor, synthetic's render)."""
    return dataset.images if hasattr(dataset, "images") else dataset.tensor()


class StudyData:
    """The profile's training subset, evaluation splits and verification pairs, loaded once per invocation."""

    def __init__(
        self, data: str, train_images: int | None, eval_limit: int | None = None, pairs: str | None = None
    ) -> None:
        self.data, self.train_images, self.eval_limit, self.pairs_spec = data, train_images, eval_limit, pairs
        self._train = None
        self._eval: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pairs = None

    def train(self):
        """The training subset (``TrainSubset``), or the whole training split when the profile takes all of it."""
        if self._train is None:
            dataset = create_dataset(self.data, split="train")
            self._train = dataset if self.train_images is None else TrainSubset(dataset, self.train_images)
        return self._train

    def pairs(self) -> PairSet | None:
        if self._pairs is None and self.pairs_spec is not None:
            self._pairs = create_pairs(self.pairs_spec)
        return self._pairs

    def eval_set(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images uint8 (N, C, H, W), labels (N,))`` of ``val`` or ``test`` (first ``eval_limit`` images)."""
        if split not in self._eval:
            ds = create_dataset(self.data, split=split)
            n = len(ds) if self.eval_limit is None else min(self.eval_limit, len(ds))
            self._eval[split] = (_images(ds)[:n], ds.labels[:n])
        return self._eval[split]


@torch.no_grad()
def logits(
    bundle: Bundle, images: torch.Tensor, teacher_head: ClassHead | None = None, device: str = "cpu", batch: int = 500
) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits of the bundle's own head and (if given) of ``teacher_head`` on the bundle's embeddings, ``(N, C)``."""
    dev = resolve_device(device)
    backbone, head = bundle.backbone.to(dev).eval(), bundle.head.to(dev).eval()
    t_head = teacher_head.to(dev).eval() if teacher_head is not None else None
    own, shared = [], []
    for start in range(0, len(images), batch):
        x = normalize(images[start : start + batch].to(dev), bundle.cfg.mean, bundle.cfg.std)
        z = backbone(x)
        own.append(head(z).float().cpu())
        if t_head is not None:
            shared.append(t_head(z).float().cpu())
    return torch.cat(own).numpy(), torch.cat(shared).numpy() if t_head is not None else None


def evaluate_student(
    bundle: Bundle, data: tuple[torch.Tensor, torch.Tensor], teacher_head: ClassHead, alpha: float | None, device: str
) -> dict:
    """``top1`` (own head), ``top1_th`` (teacher head on the student embedding), ``top1_pprime`` when ``alpha``."""
    images, labels = data
    own, shared = logits(bundle, images, teacher_head, device)
    out = {"top1": top1_accuracy(own, labels), "top1_th": top1_accuracy(shared, labels)}
    if alpha is not None:
        out["top1_pprime"] = top1_accuracy(combined_prediction(own, shared, alpha), labels)
    return out


def evaluate_teacher(bundle: Bundle, data: tuple[torch.Tensor, torch.Tensor], device: str) -> dict:
    images, labels = data
    return {"top1": top1_accuracy(logits(bundle, images, None, device)[0], labels)}


def verify_pairs(bundle: Bundle, pairs: PairSet, device: str) -> dict:
    """10-fold verification accuracy (with its 95 % interval) and TAR at the FARs the pair set resolves."""
    result = verify_bundle(bundle, pairs, device)
    return {k: result[k] for k in ("accuracy", "accuracy_ci", "tar_at_far", "tar_ci", "impostor_pairs")}


def val_curve(run_dir: Path, steps_per_epoch: int, data: tuple[torch.Tensor, torch.Tensor], device: str) -> list[float]:
    """Validation top-1 of the run's own head after each epoch, read from its per-epoch checkpoints."""
    images, labels = data
    curve = []
    for folder in checkpoint_folders(Path(run_dir)):
        step = int(CHECKPOINT_NAME.fullmatch(folder.name).group(1))
        if step % steps_per_epoch == 0:
            bundle = load_bundle(folder / "bundle.safetensors")
            curve.append(top1_accuracy(logits(bundle, images, None, device)[0], labels))
    return curve
