"""Batched embeddings (optionally flip-summed) from any forward callable, and verification of a ``PairSet``.

``forward`` is anything that maps a float32 normalized ``(B, C, H, W)`` torch tensor to ``(B, D)`` embeddings: an
``nn.Module`` in eval mode, a compiled module, or a runtime wrapper around ONNX Runtime / TensorRT (it may return a
numpy array). ``embed_batches`` is the one batched embedding loop; ``embed_images`` here, the resumable IJB pass
(``edgekd.eval.ijb``) and the export gates (``edgekd.export.checks.gates``) all run through it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from edgekd.data.pairs import PairSet
from edgekd.data.transforms import FACE_MEAN, FACE_STD, hflip, normalize
from edgekd.errors import EdgekdError
from edgekd.eval.metrics import (
    DEFAULT_FARS,
    accuracy_ci,
    flip_sum_normalize,
    resolvable_fars,
    roc_curve,
    tar_at_far,
    tar_at_far_ci,
    verification_10fold,
)
from edgekd.utils.progress import progress

__all__ = ["Forward", "embed_batches", "embed_images", "distinct_images", "evaluate_pairs"]

Forward = Callable[[torch.Tensor], torch.Tensor | np.ndarray]


def _default_device(forward: Forward) -> torch.device:
    """The device of a module's first parameter or buffer; CPU for anything else."""
    if isinstance(forward, torch.nn.Module):
        for t in (*forward.parameters(), *forward.buffers()):
            return t.device
    return torch.device("cpu")


def _batch(images: torch.Tensor | Dataset, lo: int, hi: int) -> torch.Tensor:
    """Images ``lo:hi`` as uint8 ``(B, C, H, W)``; dataset items may be bare images or ``(image, label)``."""
    if isinstance(images, torch.Tensor):
        return images[lo:hi]
    items = [images[i] for i in range(lo, hi)]
    return torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])


def _run(forward: Forward, x: torch.Tensor) -> np.ndarray:
    out = forward(x)
    if isinstance(out, (tuple, list)):  # (embedding, ...) from models that return extras
        out = out[0]
    out = out.detach().float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, dtype=np.float32)
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise EdgekdError(f"the model returned shape {out.shape} for a batch of {x.shape[0]}; expected (B, D)")
    return out


def embed_batches(
    forward: Forward,
    batches: Iterable[torch.Tensor],
    *,
    flip: bool = False,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    device: str | torch.device | None = None,
) -> Iterator[np.ndarray]:
    """The batched embedding loop: ``forward`` over each batch in turn, each under ``torch.inference_mode``.

    Args:
        forward: maps float32 normalized ``(B, C, H, W)`` images to ``(B, D)`` (a tensor, an array, or a tuple whose
            first item is one).
        batches: uint8 ``(B, C, H, W)`` images, normalized here with ``mean``/``std``; or, when ``mean`` is None,
            images normalized already.
        flip: yield ``f(x) + f(hflip(x))``, the raw sum (not normalized; the caller normalizes).
        mean: per-channel mean of ``normalize`` (None: the batches are normalized).
        std: per-channel std of ``normalize``.
        device: where each batch goes before ``forward`` (default: a module's parameter device, else CPU).

    Yields:
        float32 ``(B, D)`` per batch.

    Raises:
        EdgekdError: ``forward`` returned something other than one ``(B, D)`` row per image.
    """
    dev = torch.device(device) if device is not None else _default_device(forward)
    for batch in batches:
        with torch.inference_mode():
            x = batch.to(dev)
            if mean is not None:
                x = normalize(x, mean, std)
            emb = _run(forward, x)
            if flip:
                emb = emb + _run(forward, hflip(x))
        yield emb


def embed_images(
    forward: Forward,
    images: torch.Tensor | Dataset,
    batch_size: int = 64,
    flip: bool = True,
    mean: float | Sequence[float] = FACE_MEAN,
    std: float | Sequence[float] = FACE_STD,
    device: str | torch.device | None = None,
    desc: str = "embed",
) -> np.ndarray:
    """Embed images in batches under ``torch.inference_mode``.

    Args:
        forward: maps float32 ``(B, C, H, W)`` normalized images to ``(B, D)`` embeddings.
        images: uint8 ``(N, C, H, W)`` or a Dataset of uint8 ``(C, H, W)`` images (or ``(image, label)`` items).
        batch_size: images per forward call.
        flip: return ``f(x) + f(hflip(x))``, the raw sum (not normalized; the caller normalizes).
        mean: per-channel mean of ``normalize``.
        std: per-channel std of ``normalize``.
        device: where inputs go (default: the module's device, else CPU).
        desc: progress-bar label (the bar is silent when stderr is not a TTY).

    Returns:
        float32 ``(N, D)``.
    """
    n = len(images)
    if n == 0:
        raise EdgekdError("no images to embed")
    if batch_size < 1:
        raise EdgekdError(f"batch_size={batch_size} must be >= 1")
    chunks = []
    batches = (_batch(images, lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size))
    with progress(total=n, desc=desc, unit="img") as bar:
        for emb in embed_batches(forward, batches, flip=flip, mean=mean, std=std, device=device):
            chunks.append(emb)
            bar.update(len(emb))
    return np.concatenate(chunks).astype(np.float32, copy=False)


def distinct_images(images: torch.Tensor | Dataset) -> tuple[torch.Tensor | Dataset, np.ndarray]:
    """The distinct images of a pair set and, for each of its ``2P`` slots, the index of its image among them.

    Pair sets reuse images (LFW's pairs share faces; edgekd's synthetic gate pairs draw 3,000 pairs from 1,000 images),
    so embedding each distinct image once is up to 6x less work for the same embeddings. Tensors are compared by
    content (a hash of each image's bytes); a Dataset is left as it is (reading it all to compare would cost what is
    saved).
    """
    if not isinstance(images, torch.Tensor):
        return images, np.arange(len(images))
    flat = images.reshape(len(images), -1).contiguous().numpy()
    index: dict[bytes, int] = {}
    source: list[int] = []  # for each distinct image, the first slot that holds it
    slot = np.empty(len(images), dtype=np.int64)
    for i, row in enumerate(flat):
        key = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
        if key not in index:
            index[key] = len(source)
            source.append(i)
        slot[i] = index[key]
    return images[torch.as_tensor(source)], slot


def evaluate_pairs(
    forward: Forward,
    pairs: PairSet,
    mean: float | Sequence[float] = FACE_MEAN,
    std: float | Sequence[float] = FACE_STD,
    batch_size: int = 64,
    flip: bool = True,
    device: str | torch.device | None = None,
    nfolds: int = 10,
    fars: Sequence[float] = DEFAULT_FARS,
) -> dict:
    """Verification metrics of a model on a pair set, the insightface way.

    Embeddings are flip-summed (if ``flip``) and L2-normalized; 10-fold accuracy uses their squared L2 distance,
    the ROC and TAR@FAR use their cosine similarity.

    Args:
        forward: the model (see ``embed_images``).
        pairs: ``2P`` images and ``issame (P,)``.
        mean: normalization mean.
        std: normalization std.
        batch_size: images per forward call.
        flip: flip-sum test-time augmentation.
        device: where inputs go.
        nfolds: folds of the accuracy protocol.
        fars: target FARs for TAR@FAR.

    Returns:
        ``name``, ``pairs`` (P), ``accuracy``, ``std``, ``threshold``, ``fold_accuracies``, ``tar_at_far``
        (``{far: tar}`` at every FAR of ``fars``), and the ROC arrays ``fpr``, ``tpr``, ``thresholds``; for reports,
        ``impostors`` (the count), ``accuracy_ci`` (95 %, from the fold spread), ``tar_ci`` (``{far: (low, high)}``,
        95 % bootstrap, only at the FARs ``resolvable_fars`` keeps; report TAR at these only) and ``fars_left_out``.
    """
    unique, slot = distinct_images(pairs.images)
    emb = flip_sum_normalize(
        embed_images(forward, unique, batch_size, flip, mean, std, device, desc=f"embed {pairs.name}")
    )[slot]
    a, b = emb[0::2], emb[1::2]
    result = verification_10fold(a, b, pairs.issame, nfolds=nfolds)
    scores = np.einsum("ij,ij->i", a, b)
    fpr, tpr, thresholds = roc_curve(scores, pairs.issame)
    same = np.asarray(pairs.issame, dtype=bool)
    impostors = int((~same).sum())
    kept, dropped = resolvable_fars(impostors, fars)
    return {
        "name": pairs.name,
        "pairs": len(pairs),
        **result,
        "tar_at_far": tar_at_far(scores, pairs.issame, fars),
        "impostors": impostors,
        "accuracy_ci": accuracy_ci(result["fold_accuracies"]),
        "tar_ci": tar_at_far_ci(scores, same, kept) if kept and same.any() else {},
        "fars_left_out": dropped if same.any() else [float(far) for far in fars],
        "fpr": fpr,
        "tpr": tpr,
        "thresholds": thresholds,
    }
