"""Verification metrics against hand-computed cases and loop-based re-implementations."""

import numpy as np
import pytest
import torch

from edgekd.errors import EdgekdError
from edgekd.eval.metrics import (
    flip_sum_normalize,
    kfold_slices,
    roc_curve,
    tar_at_far,
    top1_accuracy,
    verification_10fold,
    verification_all_pairs,
)


def test_kfold_slices_size_uneven_folds_like_sklearn():
    sizes = [s.stop - s.start for s in kfold_slices(23, 10)]
    assert sizes == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    slices = kfold_slices(23, 10)
    assert slices[0].start == 0 and slices[-1].stop == 23
    assert all(a.stop == b.start for a, b in zip(slices, slices[1:], strict=False))
    with pytest.raises(EdgekdError):
        kfold_slices(9, 10)


def test_10fold_hand_computed():
    # 1-D embeddings with exactly representable squared distances: genuine 0.25, impostor 2.25, and one genuine
    # pair (index 4, in fold 2) at 3.0625 that no threshold below 4 can fix without losing the impostors.
    p = 20
    issame = np.arange(p) % 2 == 0
    b = np.where(issame, 0.5, 1.5)
    b[4] = 1.75
    res = verification_10fold(np.zeros((p, 1)), b[:, None], issame)
    # Every fold's training folds are separable from 0.25 < t <= 2.25; the first threshold with 0.25 < t is 0.26
    # (dist < t, strict). Fold 2 then misclassifies pair 4 (acc 1/2); the nine other folds are perfect.
    # Counts over fold sizes (1, 1/2) are exact; the thresholds are np.arange's 26th step and means of it, whose
    # last bits pytest.approx's default (1e-6 relative) leaves aside.
    assert res["fold_thresholds"] == pytest.approx([0.26] * 10)
    assert res["fold_accuracies"] == [1.0, 1.0, 0.5] + [1.0] * 7
    assert res["accuracy"] == pytest.approx(0.95)
    assert res["std"] == pytest.approx(0.15)  # sqrt((9 * 0.05**2 + 0.45**2) / 10)
    assert res["threshold"] == pytest.approx(0.26)


def _brute_force_10fold(emb_a, emb_b, issame, nfolds=10):
    """Direct loop version of insightface calculate_roc (np.array_split folds, float accuracies, first max)."""
    thresholds = np.arange(0, 4, 0.01)
    dist = [float(np.sum((a - b) ** 2)) for a, b in zip(emb_a, emb_b, strict=True)]
    folds = np.array_split(np.arange(len(dist)), nfolds)

    def acc(t, idx):
        return sum((dist[i] < t) == bool(issame[i]) for i in idx) / len(idx)

    accs, chosen = [], []
    for k, test in enumerate(folds):
        train = [i for j, f in enumerate(folds) if j != k for i in f]
        best_t, best_acc = None, -1.0
        for t in thresholds:
            a = acc(t, train)
            if a > best_acc:
                best_t, best_acc = t, a
        chosen.append(best_t)
        accs.append(acc(best_t, test))
    return np.mean(accs), np.std(accs), chosen, accs


def test_10fold_matches_brute_force_on_random_pairs():
    rng = np.random.default_rng(3)
    p, d = 137, 8  # uneven folds (14 x 7, 13 x 3)
    issame = rng.random(p) < 0.5
    a = rng.standard_normal((p, d))
    b = np.where(issame[:, None], a + 0.9 * rng.standard_normal((p, d)), rng.standard_normal((p, d)))
    a, b = flip_sum_normalize(a), flip_sum_normalize(b)
    mean, std, chosen, accs = _brute_force_10fold(a, b, issame)
    res = verification_10fold(a, b, issame)
    # Exact equality holds when both sides count the same pairs below each threshold: their float64 squared distances
    # (8 terms of unit vectors, ≤ 4) may differ by a few ulps (≲ 8·2⁻⁵³·4 ≈ 4e-15) where numpy sums in another order,
    # and no distance lies within 1e-12 of a threshold. Then the fold accuracies are the same integer ratios, and the
    # mean and std the same numpy reductions of the same 10 numbers.
    dist = ((a - b) ** 2).sum(1)
    assert np.abs(dist[:, None] - np.arange(0, 4, 0.01)[None, :]).min() > 1e-12
    assert res["fold_accuracies"] == accs
    assert res["fold_thresholds"] == list(chosen)
    assert res["accuracy"] == mean and res["std"] == std
    assert 0.6 < res["accuracy"] < 1.0


def test_flip_sum_normalize():
    e = np.array([[3.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    f = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, -1.0]])
    out = flip_sum_normalize(e, f)
    np.testing.assert_allclose(out, [[1, 0], [0, 0], [1, 0]])  # (4, 0)/4 and (2, 0)/2: exact; default rtol 1e-7
    np.testing.assert_allclose(flip_sum_normalize(torch.tensor([[0.0, 2.0]])), [[0, 1]])


def test_roc_curve_hand_computed_with_ties_and_drop_intermediate():
    scores = [0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    labels = [1, 1, 0, 1, 1, 0, 0, 0]
    # Distinct thresholds give (fps, tps): .9 (0,1), .8 (1,2) [tie of a genuine and an impostor], .7 (1,3), .6 (1,4),
    # .5 (2,4), .4 (3,4), .3 (4,4); 4 impostors, 4 genuines.
    fpr, tpr, thr = roc_curve(scores, labels, drop_intermediate=False)
    # Exact: rates are counts over 4, thresholds are the given scores themselves (no arithmetic on them).
    np.testing.assert_array_equal(fpr, np.array([0, 0, 1, 1, 1, 2, 3, 4]) / 4)
    np.testing.assert_array_equal(tpr, np.array([0, 1, 2, 3, 4, 4, 4, 4]) / 4)
    np.testing.assert_array_equal(thr, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    # Dropped: (1,3) inside the vertical run (1,2)-(1,4) and (2,4), (3,4) inside the horizontal run (1,4)-(4,4).
    fpr, tpr, thr = roc_curve(scores, labels)
    np.testing.assert_array_equal(fpr, [0, 0, 0.25, 0.25, 1])
    np.testing.assert_array_equal(tpr, [0, 0.25, 0.5, 1, 1])
    np.testing.assert_array_equal(thr, [np.inf, 0.9, 0.8, 0.6, 0.3])


def test_roc_curve_sklearn_docstring_example():
    # sklearn.metrics.roc_curve docstring: y = [1, 1, 2, 2] (pos_label=2), scores = [0.1, 0.4, 0.35, 0.8].
    fpr, tpr, thr = roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True]))
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_array_equal(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])


def test_roc_curve_full_matches_direct_counting():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(300), 2)  # many ties
    labels = rng.random(300) < 0.3
    fpr, tpr, thr = roc_curve(scores, labels, drop_intermediate=False)
    # Exact: each rate is a count divided by the class size on both sides (one correctly rounded division each).
    for f, t, th in zip(fpr[1:], tpr[1:], thr[1:], strict=True):
        assert f == np.mean(scores[~labels] >= th) and t == np.mean(scores[labels] >= th)
    assert list(thr[1:]) == sorted(set(scores.tolist()), reverse=True)
    fpr_d, tpr_d, _ = roc_curve(scores, labels)
    assert len(fpr_d) < len(fpr) and set(zip(fpr_d, tpr_d, strict=True)) <= set(zip(fpr, tpr, strict=True))


def test_tar_at_far_counted_by_hand():
    impostors = np.arange(1000) / 1000  # 0.000 ... 0.999
    genuines = np.array([1.5, 1.4, 1.3, 1.2, 1.1, 0.9985, 0.9984, 0.5005, 0.3005, 0.1005])
    scores = np.r_[impostors, genuines]
    labels = np.r_[np.zeros(1000, bool), np.ones(10, bool)]
    fpr, tpr, _ = roc_curve(scores, labels)
    # Kept (fps, tps): (0,1) (0,5) (1,5) (1,7) (499,7) (499,8) (699,8) (699,9) (899,9) (899,10) (1000,10). Counts over
    # 1000 and 10 against decimal literals: equal to their last bit, within the default rtol 1e-7.
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.001, 0.001, 0.499, 0.499, 0.699, 0.699, 0.899, 0.899, 1.0])
    np.testing.assert_allclose(tpr, [0, 0.1, 0.5, 0.5, 0.7, 0.7, 0.8, 0.8, 0.9, 0.9, 1.0, 1.0])
    tar = tar_at_far(scores, labels, fars=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 0.4, 0.6))
    assert tar == {  # exact: k/10 is correctly rounded, as the literal is
        1e-6: 0.5,
        1e-5: 0.5,
        1e-4: 0.5,  # nearest FPR is 0; the larger TPR among FPR = 0
        1e-3: 0.7,  # FPR 0.001 at TPR 0.5 and 0.7: the larger wins
        1e-2: 0.7,
        1e-1: 0.7,  # nearest kept point is FPR 0.001 (the run up to 0.499 was dropped)
        0.4: 0.8,  # FPR 0.499 is nearer than 0.001; TPR 0.8 beats 0.7 there
        0.6: 0.9,
    }  # FPR 0.699 (0.099 away) beats 0.499 (0.101 away)


def test_tar_at_far_default_fars_and_bad_inputs():
    tar = tar_at_far([0.9, 0.1], [1, 0])
    assert list(tar) == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1] and all(v == 1.0 for v in tar.values())
    with pytest.raises(EdgekdError, match="NaN"):
        roc_curve([0.5, np.nan], [1, 0])
    with pytest.raises(EdgekdError, match="labels"):
        roc_curve([0.5, 0.2], [2, 0])


def test_top1_accuracy():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.5, 0.5], [0.0, 1.0]])
    labels = np.array([1, 0, 1, 0])
    assert top1_accuracy(logits, labels) == 0.5  # the tie at row 2 goes to class 0, as argmax
    assert top1_accuracy(np.array([1, 0, 1, 1]), labels) == 0.75
    with pytest.raises(EdgekdError):
        top1_accuracy(np.array([1, 0]), labels)


def test_plot_roc_writes_png_atomically(tmp_path):
    from edgekd.eval.roc_plot import plot_roc

    fpr, tpr, _ = roc_curve([0.9, 0.8, 0.7, 0.3, 0.2], [1, 0, 1, 0, 0])
    path = tmp_path / "out" / "roc.png"
    plot_roc({"student": (fpr, tpr), "teacher": (fpr, np.minimum(tpr + 0.1, 1))}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["roc.png"]


def test_verification_all_pairs_scores_every_pair_once():
    """5 identities x 3 images: 15 genuine and 90 impostor pairs; TAR@FAR as from a loop over all pairs."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 3)
    emb = flip_sum_normalize(rng.normal(size=(15, 4)) + 2 * np.eye(5, 4)[labels])
    out = verification_all_pairs(emb, labels, fars=(0.1, 0.3))
    assert (out["genuine"], out["impostor"]) == (15, 90)
    pairs = [(i, j) for i in range(15) for j in range(i + 1, 15)]
    scores = np.array([emb[i] @ emb[j] for i, j in pairs])
    same = np.array([labels[i] == labels[j] for i, j in pairs])
    # The scores here are 4-term dot products of unit vectors and verification_all_pairs forms them as a matrix
    # product: a few float64 ulps apart (≲ 4·2⁻⁵³). No two scores lie within 1e-12 of each other, so both sides rank
    # the pairs alike and the TARs are the same count ratios (pytest.approx's default only absorbs the last bit).
    assert np.diff(np.sort(scores)).min() > 1e-12
    assert out["tar_at_far"] == pytest.approx(tar_at_far(scores, same, (0.1, 0.3)))
    assert 0.5 < out["accuracy"] <= 1.0 and out["std"] >= 0.0
    with pytest.raises(EdgekdError):
        verification_all_pairs(emb, labels[:-1])
