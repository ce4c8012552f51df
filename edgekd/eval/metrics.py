"""Evaluation metrics in pure numpy, computed the way insightface reports them.

- ``verification_10fold``: the LFW-style protocol of insightface ``eval/verification.py``: squared L2 distance
  of flip-summed, L2-normalized embeddings, thresholds ``np.arange(0, 4, 0.01)``, contiguous folds sized like
  sklearn ``KFold(shuffle=False)``, threshold chosen on the other folds (first maximum), mean and population std of
  the fold accuracies.
- ``roc_curve``: sklearn's ``roc_curve`` reproduced exactly (``drop_intermediate`` rule, leading ``(0, 0)`` point
  with threshold ``inf``), because IJB TAR@FAR is read off that curve.
- ``tar_at_far``: for each target FAR, the TPR at the ROC point whose FPR is nearest to it; ties go to the larger
  TPR, as insightface's search over the flipped arrays does.
- ``roc_auc`` and ``equal_error_rate``: the area under that ROC curve and the rate where it crosses FAR = 1 − TAR.
- ``combined_prediction``: the TH-KD paper's test-time mix p′ = (1 − α)·softmax(l_s) + α·softmax(l_th) of the
  student head and the frozen teacher head read on the student embedding.
- ``verification_all_pairs``: every pair of labelled embeddings (an IJB-style 1:1 protocol without templates), for
  held-out identities where no pair list exists; TAR@FAR over all pairs, 10-fold accuracy on balanced pairs.
- ``resolvable_fars``: the one rule for which FARs a pair set may report TAR at: ``FAR · N_impostor ≥ 5``
  (``MIN_FALSE_ACCEPTS``), so the threshold is set by at least five impostor scores.
- ``tar_at_far_ci`` (bootstrap over pairs) and ``accuracy_ci`` (Student-t over the fold accuracies): 95 % intervals.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgekd.errors import EdgekdError

__all__ = [
    "DEFAULT_FARS",
    "THRESHOLDS",
    "flip_sum_normalize",
    "kfold_slices",
    "verification_10fold",
    "verification_all_pairs",
    "roc_curve",
    "tar_at_far",
    "roc_auc",
    "equal_error_rate",
    "MIN_FALSE_ACCEPTS",
    "resolvable_fars",
    "far_rule_reason",
    "tar_at_far_ci",
    "accuracy_ci",
    "top1_accuracy",
    "combined_prediction",
]

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
THRESHOLDS = np.arange(0, 4, 0.01)


def _numpy(x) -> np.ndarray:
    """A numpy view of an array-like or a (possibly CUDA, possibly grad-tracking) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def flip_sum_normalize(emb: np.ndarray, emb_flip: np.ndarray | None = None) -> np.ndarray:
    """Add the flipped images' embeddings (if given) and L2-normalize each row; zero rows stay zero.

    Args:
        emb: raw embeddings ``(N, D)``.
        emb_flip: raw embeddings of the horizontally flipped images ``(N, D)``, or None.

    Returns:
        float64 ``(N, D)`` rows of unit norm (as ``sklearn.preprocessing.normalize``).
    """
    e = _numpy(emb).astype(np.float64)
    if emb_flip is not None:
        f = _numpy(emb_flip)
        if f.shape != e.shape:
            raise EdgekdError(f"embedding shapes differ: {e.shape} and flipped {f.shape}")
        e = e + f
    if e.ndim != 2:
        raise EdgekdError(f"embeddings must be (N, D), got shape {e.shape}")
    norm = np.sqrt(np.einsum("ij,ij->i", e, e))
    norm[norm == 0] = 1.0
    return e / norm[:, None]


def kfold_slices(n: int, nfolds: int) -> list[slice]:
    """Contiguous folds as sklearn ``KFold(nfolds, shuffle=False)``: the first ``n % nfolds`` get one extra item."""
    if nfolds < 2 or n < nfolds:
        raise EdgekdError(f"{nfolds}-fold evaluation needs nfolds >= 2 and at least {nfolds} pairs, got {n}")
    sizes = np.full(nfolds, n // nfolds)
    sizes[: n % nfolds] += 1
    stops = np.cumsum(sizes)
    return [slice(int(stop - size), int(stop)) for size, stop in zip(sizes, stops, strict=True)]


def _correct_counts(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Correct decisions ``tp + tn`` at each threshold, predicting "same" when ``dist < threshold``; ``(T,)``."""
    gen = np.sort(dist[issame])
    imp = np.sort(dist[~issame])
    tp = np.searchsorted(gen, thresholds, side="left")  # genuine pairs strictly below the threshold
    tn = len(imp) - np.searchsorted(imp, thresholds, side="left")  # impostors at or above it
    return tp + tn


def verification_10fold(
    emb_a: np.ndarray, emb_b: np.ndarray, issame: np.ndarray, nfolds: int = 10, thresholds: np.ndarray | None = None
) -> dict:
    """insightface verification accuracy (LFW, CFP-FP, AgeDB protocol).

    Args:
        emb_a: first images' embeddings ``(P, D)``, already flip-summed and L2-normalized.
        emb_b: second images' embeddings ``(P, D)``, the same.
        issame: bool ``(P,)``, True for genuine pairs.
        nfolds: number of contiguous folds.
        thresholds: squared-L2 thresholds to search (default ``np.arange(0, 4, 0.01)``).

    Returns:
        ``accuracy`` (mean over folds), ``std`` (population std over folds), ``threshold`` (mean of the
        per-fold chosen thresholds), ``fold_accuracies`` and ``fold_thresholds`` (lists of ``nfolds``).
    """
    a, b = _numpy(emb_a).astype(np.float64), _numpy(emb_b).astype(np.float64)
    same = _numpy(issame).astype(bool).reshape(-1)
    if a.shape != b.shape or a.ndim != 2 or len(a) != len(same):
        raise EdgekdError(f"pair embeddings {a.shape}, {b.shape} and labels ({len(same)},) do not match")
    if not np.isfinite(a).all() or not np.isfinite(b).all():
        raise EdgekdError("embeddings contain NaN or inf; the model output is not finite")
    th = THRESHOLDS if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    dist = np.sum(np.square(a - b), axis=1)
    folds = kfold_slices(len(dist), nfolds)
    total = _correct_counts(dist, same, th)
    accs, chosen = [], []
    for fold in folds:
        d_test, s_test = dist[fold], same[fold]
        test = _correct_counts(d_test, s_test, th)
        best = int(np.argmax(total - test))  # train folds = all minus this fold; ties -> first threshold
        chosen.append(float(th[best]))
        accs.append(float(test[best]) / len(d_test))
    accs_np = np.array(accs)
    return {
        "accuracy": float(accs_np.mean()),
        "std": float(accs_np.std()),
        "threshold": float(np.mean(chosen)),
        "fold_accuracies": accs,
        "fold_thresholds": chosen,
    }


def _binary_inputs(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = _numpy(scores).astype(np.float64).reshape(-1)
    y = _numpy(labels).reshape(-1)
    if len(s) != len(y):
        raise EdgekdError(f"{len(s)} scores but {len(y)} labels")
    if len(s) == 0:
        raise EdgekdError("no scores to build a ROC curve from")
    if not np.isfinite(s).all():
        raise EdgekdError("scores contain NaN or inf; the model output is not finite")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise EdgekdError("labels must be boolean or 0/1")
        y = y == 1
    return s, y


def roc_curve(scores, labels, drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve for "higher score means genuine", identical to ``sklearn.metrics.roc_curve(labels, scores)``.

    Args:
        scores: similarity per pair ``(P,)``.
        labels: bool or 0/1 ``(P,)``, True for genuine.
        drop_intermediate: drop points that are collinear with both neighbours on the unit-step curve (sklearn's
            rule: keep a point where the second difference of false or true positive counts is non-zero).

    Returns:
        ``fpr``, ``tpr`` and ``thresholds``, each ``(K,)``, by decreasing threshold; the first point is
        ``(0, 0)`` with threshold ``inf``. A rate is NaN when its class is absent (sklearn warns there).
    """
    s, y = _binary_inputs(scores, labels)
    order = np.argsort(s, kind="mergesort")[::-1]  # descending; stable on the reversed array, like sklearn
    s, y = s[order], y[order]
    distinct = np.where(np.diff(s))[0]
    idx = np.r_[distinct, len(y) - 1]
    tps = np.cumsum(y, dtype=np.float64)[idx]
    fps = 1 + idx - tps
    thresholds = s[idx]
    if drop_intermediate and len(fps) > 2:
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps = np.r_[0.0, tps]
    fps = np.r_[0.0, fps]
    thresholds = np.r_[np.inf, thresholds]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thresholds


def tar_at_far(scores, labels, fars: Sequence[float] = DEFAULT_FARS) -> dict[float, float]:
    """True accept rate at each false accept rate, read off ``roc_curve`` as insightface's IJB scripts do.

    For each target FAR the ROC point with the nearest FPR (absolute difference) is taken; among equally near
    points the one with the larger TPR wins. No interpolation: with ``N`` impostors FARs below ``1/N`` snap to
    the nearest reachable point.

    Args:
        scores: similarity per pair ``(P,)``.
        labels: bool or 0/1 ``(P,)``, True for genuine.
        fars: target false accept rates.

    Returns:
        ``{far: tar}`` with TAR as a fraction in [0, 1].
    """
    fpr, tpr, _ = roc_curve(scores, labels)
    fpr, tpr = fpr[::-1], tpr[::-1]  # the flip puts the larger TPR first among equal FPRs
    return {float(far): float(tpr[_nearest(fpr, far)]) for far in fars}


def _nearest(fpr_flipped: np.ndarray, far: float) -> int:
    """Index of the ROC point ``tar_at_far`` reads for ``far`` (first minimum of the flipped array)."""
    return int(np.argmin(np.abs(fpr_flipped - far)))


def _roc_arrays(fpr, tpr) -> tuple[np.ndarray, np.ndarray]:
    f, t = _numpy(fpr).astype(np.float64).reshape(-1), _numpy(tpr).astype(np.float64).reshape(-1)
    if len(f) != len(t) or len(f) < 2:
        raise EdgekdError(
            f"a ROC curve needs matching FPR and TPR arrays of 2 points or more, got {len(f)} and {len(t)}"
        )
    if not (np.isfinite(f).all() and np.isfinite(t).all()):
        raise EdgekdError("the ROC curve has NaN rates: its pairs are all genuine or all impostor")
    return f, t


def roc_auc(fpr, tpr) -> float:
    """Area under a ROC curve from ``roc_curve``, by the trapezoid rule.

    On that curve it is exact: the probability that a genuine pair scores above an impostor pair, ties counted half
    (``sklearn.metrics.roc_auc_score``): between neighbouring points the pairs of one tied score are accepted
    together, which is the straight segment, and the points ``drop_intermediate`` removes lie on straight segments.

    Args:
        fpr: false positive rates ``(K,)``, non-decreasing, from 0 to 1.
        tpr: true positive rates ``(K,)``, the same.
    """
    f, t = _roc_arrays(fpr, tpr)
    return float(np.sum(np.diff(f) * (t[1:] + t[:-1]) / 2))


def equal_error_rate(fpr, tpr) -> float:
    """The rate at which false accepts equal false rejects (FAR = 1 − TAR): where the ROC curve, straight between its
    points as ``roc_auc`` integrates it, crosses the anti-diagonal.

    Args:
        fpr: false positive rates ``(K,)`` from ``roc_curve``, starting at the point (0, 0).
        tpr: true positive rates ``(K,)``, ending at the point (1, 1).
    """
    f, t = _roc_arrays(fpr, tpr)
    gap = f + t - 1  # FAR − FRR: non-decreasing along the curve, from −1 at (0, 0) to 1 at (1, 1)
    i = int(np.argmax(gap >= 0))
    if gap[i] == 0 or i == 0:
        return float(f[i])
    w = -gap[i - 1] / (gap[i] - gap[i - 1])
    return float(f[i - 1] + w * (f[i] - f[i - 1]))


# The resolvability rule. With N impostor pairs, TAR@FAR is read at the threshold that lets k = FAR·N impostors
# through, i.e. at an impostor order statistic. The FAR that threshold really has on the population is about
# Gamma(k)/N: with k = 1 it is anywhere in [0.05, 3]× the target (90 %), and every FAR below 1/N snaps to the same
# ROC point (the repeated numbers of issue 25); with k = 5 it is within [0.4, 1.8]× the target, less than the factor
# of 10 between reported FARs, so neighbouring columns measure different operating points. (k = 10 narrows that to
# [0.5, 1.6]× but would drop TAR@1e-3 from a 6,000-impostor set, the size such a column is usually quoted for.)
MIN_FALSE_ACCEPTS = 5


def resolvable_fars(
    n_impostor: int, fars: Sequence[float] = DEFAULT_FARS, min_false_accepts: int = MIN_FALSE_ACCEPTS
) -> tuple[list[float], list[float]]:
    """Split ``fars`` into those ``n_impostor`` impostor pairs resolve and those they do not.

    A FAR is resolvable when ``FAR · n_impostor ≥ min_false_accepts`` (see ``MIN_FALSE_ACCEPTS``): the threshold
    is then set by at least that many impostor scores. 150 impostors resolve 1e-1 only; 6,000 resolve 1e-3 and up.

    Returns:
        ``(kept, dropped)``, each in the order of ``fars``.
    """
    kept, dropped = [], []
    for far in fars:
        ok = float(far) * n_impostor >= min_false_accepts * (1 - 1e-9)  # 1e-2 · 500 is 4.999… in floating point
        (kept if ok else dropped).append(float(far))
    return kept, dropped


def far_rule_reason(n_impostor: int, min_false_accepts: int = MIN_FALSE_ACCEPTS) -> str:
    """Why FARs were left out, in one sentence, for reports."""
    floor = min_false_accepts / max(n_impostor, 1)
    return (
        f"TAR is reported only where FAR x {n_impostor} impostor pairs >= {min_false_accepts} (at least "
        f"{min_false_accepts} impostor scores set the threshold), i.e. FAR >= {floor:.1e}"
    )


def _false_accepts(scores: np.ndarray, labels: np.ndarray, fars: Sequence[float]) -> list[int]:
    """For each FAR, the impostor count ``k`` above the threshold of the ROC point ``tar_at_far`` reads.

    That point's TAR is the fraction of genuine scores strictly above the ``(k+1)``-th highest impostor score (the
    largest TPR among points with ``k`` false accepts), which is the statistic the bootstrap resamples.
    """
    fpr, _, _ = roc_curve(scores, labels)
    n_imp = int(np.sum(~labels))
    fpr = fpr[::-1]
    return [int(round(fpr[_nearest(fpr, far)] * n_imp)) for far in fars]


def tar_at_far_ci(
    scores, labels, fars: Sequence[float] = DEFAULT_FARS, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[float, tuple[float, float]]:
    """Percentile bootstrap interval of ``tar_at_far`` at each FAR, resampling genuine and impostor pairs separately.

    The FAR is held at the point estimate's operating point (``k`` false accepts of ``N`` impostors). A resample
    of the impostors moves the threshold, its ``(k+1)``-th highest score; a resample of the genuine pairs moves the
    count above it. Neither resample is materialized: the ``(k+1)``-th smallest of ``N`` uniforms is
    ``Beta(k+1, N−k)`` and picks the resampled order statistic, and the genuine count above a threshold is
    ``Binomial(n_gen, p)`` with ``p`` the sample's fraction above it, which is the same distribution as resampling
    (``n_boot`` × FARs draws; FARs are resampled independently, which leaves each interval unchanged).

    Args:
        scores: similarity per pair ``(P,)``.
        labels: bool or 0/1 ``(P,)``, True for genuine.
        fars: target false accept rates.
        n_boot: bootstrap resamples.
        seed: seeds the resamples (the same seed gives the same intervals).
        level: coverage of the percentile interval.

    Returns:
        ``{far: (low, high)}``, fractions.
    """
    s, y = _binary_inputs(scores, labels)
    gen, imp_desc = np.sort(s[y]), np.sort(s[~y])[::-1]
    n_gen, n_imp = len(gen), len(imp_desc)
    if n_gen == 0 or n_imp == 0:
        raise EdgekdError(f"a TAR interval needs genuine and impostor pairs, got {n_gen} and {n_imp}")
    rng = np.random.default_rng(seed)
    out = {}
    for far, k in zip(fars, _false_accepts(s, y, fars), strict=True):
        if k >= n_imp:  # every impostor accepted: the threshold is below all scores
            out[float(far)] = (1.0, 1.0)
            continue
        u = rng.beta(k + 1, n_imp - k, size=n_boot)
        threshold = imp_desc[np.minimum((u * n_imp).astype(np.int64), n_imp - 1)]
        above = (n_gen - np.searchsorted(gen, threshold, side="right")) / n_gen
        tar = rng.binomial(n_gen, above) / n_gen
        low, high = np.quantile(tar, [(1 - level) / 2, (1 + level) / 2])
        out[float(far)] = (float(low), float(high))
    return out


# Student t 97.5 % quantiles by degrees of freedom (a 95 % two-sided interval); beyond 20 a Cornish-Fisher expansion.
_T975 = {
    1: 12.706204736174707, 2: 4.302652729749464, 3: 3.182446305284263, 4: 2.7764451051977934,
    5: 2.570581835636314, 6: 2.4469118511449666, 7: 2.3646242515927853, 8: 2.306004135204168,
    9: 2.2621571627409915, 10: 2.2281388519649385, 11: 2.200985160082949, 12: 2.1788128296672284,
    13: 2.1603686564627917, 14: 2.1447866879169273, 15: 2.131449545559323, 16: 2.1199052992210112,
    17: 2.1098155778331806, 18: 2.10092204024096, 19: 2.093024054408263, 20: 2.0859634472658644,
}  # fmt: skip


def _t975(df: int) -> float:
    if df in _T975:
        return _T975[df]
    z = 1.959963984540054
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def accuracy_ci(fold_accuracies: Sequence[float]) -> tuple[float, float]:
    """95 % interval of the mean fold accuracy: ``mean ± t(0.975, n−1) · s / √n`` over the ``n`` fold accuracies
    (``s`` the sample std), clipped to [0, 1]. The test folds are disjoint, so their accuracies are the spread the
    10-fold protocol itself measures; no extra resampling is needed."""
    acc = np.asarray(fold_accuracies, dtype=np.float64)
    if len(acc) < 2:
        raise EdgekdError(f"an accuracy interval needs at least 2 folds, got {len(acc)}")
    half = _t975(len(acc) - 1) * acc.std(ddof=1) / np.sqrt(len(acc))
    return float(max(acc.mean() - half, 0.0)), float(min(acc.mean() + half, 1.0))


def verification_all_pairs(
    emb: np.ndarray, labels: np.ndarray, fars: Sequence[float] = DEFAULT_FARS, nfolds: int = 10, seed: int = 0
) -> dict:
    """Verification over every pair of ``N`` labelled embeddings.

    TAR@FAR is read off the ROC of all ``N·(N−1)/2`` pairs (as IJB 1:1 protocols use every genuine and impostor
    pair), so ``N`` forward passes resolve small FARs: 2,000 images give about two million pairs. The ``nfolds``-fold
    accuracy uses all genuine pairs and as many impostor pairs drawn with ``seed``, interleaved so each fold is
    balanced. Scores come from the ``(N, N)`` Gram matrix; gathering rows per pair would hold ``N²/2`` rows of ``D``.

    Args:
        emb: ``(N, D)`` embeddings, already flip-summed and L2-normalized.
        labels: ``(N,)`` identity of each embedding.
        fars: target false accept rates.
        nfolds: folds of the accuracy protocol.
        seed: draws the impostor pairs of the accuracy protocol.

    Returns:
        ``accuracy`` and ``std`` (as ``verification_10fold``), ``tar_at_far`` (``{far: tar}``), and the ``genuine``
        and ``impostor`` pair counts.
    """
    emb, labels = _numpy(emb), _numpy(labels).reshape(-1)
    if emb.ndim != 2 or len(emb) != len(labels):
        raise EdgekdError(f"embeddings {emb.shape} and labels ({len(labels)},) do not match")
    a, b = np.triu_indices(len(emb), 1)
    scores = (emb @ emb.T)[a, b]
    same = labels[a] == labels[b]
    genuine = np.flatnonzero(same)
    rng = np.random.default_rng(seed)
    impostor = rng.choice(np.flatnonzero(~same), size=min(len(genuine), int((~same).sum())), replace=False)
    n = min(len(genuine), len(impostor))
    pairs = np.empty(2 * n, dtype=np.int64)
    pairs[0::2], pairs[1::2] = rng.permutation(genuine)[:n], impostor[:n]
    folds = verification_10fold(emb[a[pairs]], emb[b[pairs]], same[pairs], nfolds=nfolds)
    return {
        "accuracy": folds["accuracy"],
        "std": folds["std"],
        "tar_at_far": tar_at_far(scores, same, fars),
        "genuine": int(same.sum()),
        "impostor": int((~same).sum()),
    }


def top1_accuracy(logits_or_pred, labels) -> float:
    """Fraction of correct top-1 predictions.

    Args:
        logits_or_pred: class scores ``(N, C)`` (argmax taken, first on ties) or predicted classes ``(N,)``.
        labels: true classes ``(N,)``.
    """
    p = _numpy(logits_or_pred)
    y = _numpy(labels).reshape(-1)
    pred = p.argmax(axis=1) if p.ndim == 2 else p.reshape(-1)
    if len(pred) != len(y):
        raise EdgekdError(f"{len(pred)} predictions but {len(y)} labels")
    if len(y) == 0:
        raise EdgekdError("top-1 accuracy of an empty set")
    return float(np.mean(pred == y))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def combined_prediction(student_logits, teacher_head_logits, alpha: float) -> np.ndarray:
    """The TH-KD paper's combined prediction ``p′ = (1 − α)·softmax(l_s) + α·softmax(l_th)``.

    Args:
        student_logits: ``(N, C)`` logits of the student's own head.
        teacher_head_logits: ``(N, C)`` logits of the frozen teacher head applied to the student embedding.
        alpha: α^TH in [0, 1]; 0 gives the student head's probabilities, 1 the teacher head's.

    Returns:
        float64 ``(N, C)`` class probabilities (rows sum to 1).
    """
    ls = _numpy(student_logits).astype(np.float64)
    lt = _numpy(teacher_head_logits).astype(np.float64)
    if ls.ndim != 2 or ls.shape != lt.shape:
        raise EdgekdError(f"student logits {ls.shape} and teacher-head logits {lt.shape} must be the same (N, C)")
    if not 0.0 <= alpha <= 1.0:
        raise EdgekdError(f"alpha={alpha} must be in [0, 1]")
    return (1.0 - alpha) * _softmax(ls) + alpha * _softmax(lt)
