"""IJB-B / IJB-C 1:1 verification: resumable embedding pass, media/template pooling, pair scores, TAR@FAR.

Follows insightface ``eval_ijbc.py`` (reference/face.md §4.3): each crop is aligned to the ArcFace template, embedded
with and without a horizontal flip and the two raw embeddings summed (``flip``); with ``norm_score`` the image
features are not L2-normalized (their norm acts as a quality weight); with ``detector_score`` they are multiplied by
the faceness score. A template is the sum over its media of the mean feature within each media, L2-normalized; a pair
scores the dot product of its two templates. TAR is read at the ROC point whose FAR is nearest each target.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from edgekd.atomic import atomic_path, write_json
from edgekd.data.ijb import IJBImages, IJBProtocol, load_ijb
from edgekd.errors import DataError
from edgekd.eval.embed import Forward, embed_batches
from edgekd.eval.metrics import DEFAULT_FARS, roc_curve, tar_at_far
from edgekd.eval.roc_plot import plot_roc
from edgekd.utils.env import environment
from edgekd.utils.progress import progress

__all__ = ["embed_images_resumable", "image_features", "template_features", "pair_scores", "evaluate_ijb"]


def _load_progress(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def embed_images_resumable(
    forward: Forward,
    dataset: torch.utils.data.Dataset,
    work_dir: str | os.PathLike,
    key: str,
    batch_size: int = 128,
    mean: float | Sequence[float] = (0.5, 0.5, 0.5),
    std: float | Sequence[float] = (0.5, 0.5, 0.5),
    flip: bool = True,
    num_workers: int = 0,
    save_every: int = 10,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Raw (unnormalized) embeddings of every image, flip-summed, written to a memmap that survives interruption.

    ``work_dir/features.f32`` holds the ``(N, D)`` float32 rows and ``work_dir/progress.json`` how many are final;
    the JSON is replaced atomically every ``save_every`` batches, after the rows are flushed. A later call with the
    same ``key`` continues after the last saved row; a different ``key`` starts over.

    Args:
        forward: maps a normalized float32 ``(B, 3, S, S)`` batch to ``(B, D)`` (torch or numpy).
        dataset: item ``i`` is uint8 ``(3, S, S)``.
        work_dir: folder for the memmap and the progress file.
        key: identifies model, data and preprocessing; stored in the progress file.
        batch_size: images per forward call.
        mean: normalization mean (``[0, 1]`` units).
        std: normalization std.
        flip: add the embedding of the mirrored image.
        num_workers: DataLoader worker processes for decoding and alignment.
        save_every: batches between progress saves.
        device: where batches go before ``forward`` (default: a module's parameter device, else CPU).

    Returns:
        float32 ``(N, D)`` (a read-only memmap).
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    feat_path, prog_path = work_dir / "features.f32", work_dir / "progress.json"
    n = len(dataset)
    if n == 0:
        raise DataError("no images to embed")
    state = _load_progress(prog_path)
    if not (state and state.get("key") == key and state.get("num_images") == n and feat_path.is_file()
            and feat_path.stat().st_size == n * state["dim"] * 4):  # fmt: skip
        state = {"key": key, "num_images": n, "dim": None, "done": 0}
    done, feats = int(state["done"]), None
    if state["dim"]:
        if done >= n:
            return np.memmap(feat_path, np.float32, "r", shape=(n, state["dim"]))
        feats = np.memmap(feat_path, np.float32, "r+", shape=(n, state["dim"]))

    def save(rows: int) -> None:
        feats.flush()
        state["done"] = rows
        write_json(prog_path, state)

    loader = DataLoader(Subset(dataset, range(done, n)), batch_size=batch_size, num_workers=num_workers)
    batches = progress(loader, total=len(loader), desc="embed", unit="batch")
    for count, emb in enumerate(embed_batches(forward, batches, flip=flip, mean=mean, std=std, device=device), 1):
        if feats is None:
            state["dim"] = int(emb.shape[1])
            with atomic_path(feat_path) as tmp:  # sized file in place before any progress points at it
                np.memmap(tmp, np.float32, "w+", shape=(n, state["dim"])).flush()
            feats = np.memmap(feat_path, np.float32, "r+", shape=(n, state["dim"]))
        feats[done : done + len(emb)] = emb
        done += len(emb)
        if count % save_every == 0:
            save(done)
    save(done)
    return np.memmap(feat_path, np.float32, "r", shape=(n, state["dim"]))


def image_features(
    raw: np.ndarray, faceness: np.ndarray, norm_score: bool = True, detector_score: bool = True
) -> np.ndarray:
    """Per-image features from raw flip-summed embeddings ``(N, D)``: L2-normalized unless ``norm_score``, then
    scaled by the faceness ``(N,)`` when ``detector_score``."""
    feats = np.asarray(raw, dtype=np.float32)
    if not norm_score:
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    if detector_score:
        feats = feats * np.asarray(faceness, np.float32)[:, None]
    return feats


def template_features(feats: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool image features ``(N, D)`` into L2-normalized template features: mean within a media, sum across media.

    Returns:
        sorted unique template ids ``(T,)`` and their features float32 ``(T, D)`` (zero for an all-zero template).
    """
    t_ids, t_idx = np.unique(templates, return_inverse=True)
    tm, m_idx = np.unique(np.stack([t_idx.ravel(), np.asarray(medias).ravel()], 1), axis=0, return_inverse=True)
    m_idx = torch.from_numpy(m_idx.ravel())
    x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    media_sum = torch.zeros(len(tm), x.shape[1]).index_add_(0, m_idx, x)  # float32, as insightface
    media_mean = media_sum / torch.bincount(m_idx, minlength=len(tm)).unsqueeze(1)
    tmpl = torch.zeros(len(t_ids), x.shape[1]).index_add_(0, torch.from_numpy(tm[:, 0]), media_mean)
    return t_ids, (tmpl / tmpl.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()


def pair_scores(t_ids: np.ndarray, t_feats: np.ndarray, pairs: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """Cosine score of each template pair ``(P, 2)`` (template ids), float32 ``(P,)``."""
    pairs = np.asarray(pairs)
    pos = np.searchsorted(t_ids, pairs)
    pos_c = np.minimum(pos, len(t_ids) - 1)
    bad = t_ids[pos_c] != pairs
    if bad.any():
        raise DataError(f"pair list names template {int(pairs[bad][0])}, which has no images")
    feats = torch.from_numpy(t_feats)
    out = np.empty(len(pairs), np.float32)
    for s in range(0, len(pairs), chunk):
        a, b = torch.from_numpy(pos_c[s : s + chunk, 0]), torch.from_numpy(pos_c[s : s + chunk, 1])
        out[s : s + chunk] = (feats[a] * feats[b]).sum(1).numpy()
    return out


def evaluate_ijb(
    forward: Forward,
    root: str | os.PathLike | IJBProtocol,
    work_dir: str | os.PathLike,
    batch_size: int = 128,
    mean: float | Sequence[float] = (0.5, 0.5, 0.5),
    std: float | Sequence[float] = (0.5, 0.5, 0.5),
    flip: bool = True,
    norm_score: bool = True,
    detector_score: bool = True,
    image_size: int = 112,
    num_workers: int = 0,
    fars: Sequence[float] = DEFAULT_FARS,
    model_key: str = "",
    save_every: int = 10,
    plot: bool = True,
    device: str | torch.device | None = None,
) -> dict:
    """IJB-B/C 1:1 TAR@FAR of any embedding function, resumable through ``work_dir``.

    Args:
        forward: normalized float32 ``(B, 3, S, S)`` -> ``(B, D)``; a checkpoint's model or an ONNX/TensorRT runtime.
        root: the IJBC/IJBB folder (or a protocol from ``load_ijb``).
        work_dir: holds the embedding memmap, progress, scores, result JSON and ROC plot.
        batch_size: images per forward call.
        mean: input normalization mean (``[0, 1]`` units).
        std: input normalization std.
        flip: sum the embeddings of each image and its mirror.
        norm_score: keep the feature norm (no per-image L2 normalization).
        detector_score: weight each image by its faceness score.
        image_size: aligned crop side.
        num_workers: DataLoader workers decoding and aligning crops.
        fars: target false accept rates.
        model_key: identifies the model (e.g. a checkpoint hash); a different key re-embeds instead of resuming.
        save_every: batches between progress saves.
        plot: write ``roc.png``.
        device: where batches go before ``forward`` (default: a module's parameter device, else CPU).

    Returns:
        dict with ``dataset``, ``tar_at_far`` (``{"1e-06": TAR, ..., "0.1": TAR}``, fractions), counts, options
        and ``paths``.
    """
    proto = root if isinstance(root, IJBProtocol) else load_ijb(root)
    work_dir = Path(work_dir)
    key = json.dumps([proto.fingerprint(), model_key, list(np.atleast_1d(mean).astype(float)),
                      list(np.atleast_1d(std).astype(float)), bool(flip), int(image_size)])  # fmt: skip
    raw = embed_images_resumable(forward, IJBImages(proto, image_size), work_dir, key, batch_size, mean, std, flip,
                                 num_workers, save_every, device)  # fmt: skip
    feats = image_features(raw, proto.faceness, norm_score, detector_score)
    t_ids, t_feats = template_features(feats, proto.templates, proto.medias)
    scores = pair_scores(t_ids, t_feats, proto.pairs)
    labels = proto.labels.astype(np.int64)
    tar_map = {str(far): tar for far, tar in tar_at_far(scores, labels, fars).items()}
    paths = {"features": str(work_dir / "features.f32"), "progress": str(work_dir / "progress.json"),
             "scores": str(work_dir / "scores.npy"), "result": str(work_dir / "ijb_result.json")}  # fmt: skip
    with atomic_path(paths["scores"]) as tmp, open(tmp, "wb") as f:
        np.save(f, scores)
    if plot:
        fpr, tpr, _ = roc_curve(scores, labels)
        paths["roc_plot"] = str(work_dir / "roc.png")
        plot_roc({f"{proto.name} {model_key}".strip(): (fpr, tpr)}, paths["roc_plot"])
    result = {
        "dataset": proto.name,
        "tar_at_far": tar_map,
        "num_images": len(proto.images),
        "num_templates": len(t_ids),
        "num_pairs": len(scores),
        "num_genuine": int((labels == 1).sum()),
        "options": {
            "flip": flip,
            "norm_score": norm_score,
            "detector_score": detector_score,
            "image_size": image_size,
            "mean": list(np.atleast_1d(mean).astype(float)),
            "std": list(np.atleast_1d(std).astype(float)),
            "model_key": model_key,
        },  # fmt: skip
        "paths": paths,
    }
    write_json(paths["result"], {**result, "environment": environment()})
    return result
