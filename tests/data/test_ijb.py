"""IJB-B/C: protocol parsing, 5-point alignment, pooling and TAR@FAR against a hand computation, resumable embedding."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from edgekd.data.align import ARCFACE_TEMPLATE, align_face, similarity_transform, warp_affine
from edgekd.data.ijb import IJBImages, load_ijb
from edgekd.errors import DataError
from edgekd.eval.ijb import embed_images_resumable, evaluate_ijb
from edgekd.eval.metrics import tar_at_far

# template -> list of (media, faceness); templates 1 & 2 and 3 & 4 are the same identity
TEMPLATES = {
    1: [(10, 0.9), (10, 0.7), (11, 1.0)],
    2: [(20, 0.8), (21, 0.95)],
    3: [(30, 0.6), (30, 0.9), (30, 0.85), (31, 1.0)],
    4: [(40, 0.75), (41, 0.9), (41, 0.8)],
    5: [(50, 0.99)],
}
IDENTITY = {1: 0, 2: 0, 3: 1, 4: 1, 5: 2}
PAIRS = [(1, 2, 1), (3, 4, 1), (1, 3, 0), (1, 4, 0), (2, 3, 0), (2, 4, 0), (5, 1, 0), (5, 3, 0), (4, 5, 0)]


def _rows():
    rows = []
    for tid, items in TEMPLATES.items():
        for mid, score in items:
            rows.append((f"{len(rows) + 1}.jpg", tid, mid, score))
    return rows


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    """A tiny IJBC folder: 112×112 crops whose landmarks are the ArcFace template (alignment = identity)."""
    root = tmp_path_factory.mktemp("IJBC")
    (root / "meta").mkdir()
    (root / "loose_crop").mkdir()
    rng = np.random.default_rng(0)
    bases = rng.uniform(40, 215, (3, 1, 1, 3)) + rng.normal(0, 25, (3, 112, 112, 3))
    lmk = " ".join(f"{v:.4f}" for v in ARCFACE_TEMPLATE.ravel())
    tid_lines, lmk_lines = [], []
    for name, tid, mid, score in _rows():
        img = bases[IDENTITY[tid]] + rng.normal(0, 20, (112, 112, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "loose_crop" / name, quality=95)
        tid_lines.append(f"{name} {tid} {mid}")
        lmk_lines.append(f"{name} {lmk} {score}")
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("".join(f"{a} {b} {y}\n" for a, b, y in PAIRS))
    return root


def _model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.AvgPool2d(8), torch.nn.Flatten(), torch.nn.Linear(3 * 14 * 14, 16)).eval()


def _hand_scores(root, model, flip, norm_score, detector_score):
    """Straight-line re-implementation: decode, embed, weight, pool per media then template, cosine per pair."""
    feats = {}
    for name, tid, mid, score in _rows():
        x = torch.from_numpy(np.asarray(Image.open(root / "loose_crop" / name).convert("RGB")).copy())
        x = (x.permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
        with torch.no_grad():
            f = model(x)[0].double().numpy()
            if flip:
                f = f + model(torch.flip(x, dims=[3]))[0].double().numpy()
        if not norm_score:
            f = f / np.linalg.norm(f)
        if detector_score:
            f = f * score
        feats.setdefault(tid, {}).setdefault(mid, []).append(f)
    templates = {}
    for tid, medias in feats.items():
        total = sum(np.mean(fs, axis=0) for fs in medias.values())
        templates[tid] = total / np.linalg.norm(total)
    return np.array([templates[a] @ templates[b] for a, b, _ in PAIRS])


def test_load_ijb_protocol(ijb_root):
    proto = load_ijb(ijb_root)
    assert proto.name == "IJBC" and len(proto.images) == 13 and proto.images[0] == "1.jpg"
    assert proto.templates.tolist()[:4] == [1, 1, 1, 2] and proto.medias.tolist()[:4] == [10, 10, 11, 20]
    # the file holds the template printed to 4 decimals, the template's own precision: 1e-4 is one printed digit
    assert proto.landmarks.shape == (13, 5, 2) and np.allclose(proto.landmarks[3], ARCFACE_TEMPLATE, atol=1e-4)
    assert proto.faceness[1] == pytest.approx(0.7)
    assert proto.pairs.tolist()[0] == [1, 2] and proto.labels.tolist() == [y for *_, y in PAIRS]


def test_load_ijb_reordered_lists_and_errors(tmp_path, ijb_root):
    root = tmp_path / "IJBB"
    (root / "meta").mkdir(parents=True)
    tid = (ijb_root / "meta" / "ijbc_face_tid_mid.txt").read_text().splitlines()
    (root / "meta" / "ijbb_face_tid_mid.txt").write_text("\n".join(tid[::-1]) + "\n")  # other order: joined by name
    lmk = (ijb_root / "meta" / "ijbc_name_5pts_score.txt").read_text()
    (root / "meta" / "ijbb_name_5pts_score.txt").write_text(lmk)
    (root / "meta" / "ijbb_template_pair_label.txt").write_text("1 2 1\n3 4 0\n")
    proto = load_ijb(root)
    assert proto.name == "IJBB" and proto.templates.tolist()[:4] == [1, 1, 1, 2]
    (root / "meta" / "ijbb_template_pair_label.txt").write_text("1 2 1\n3 x 0\n")
    with pytest.raises(DataError, match="ijbb_template_pair_label.txt: expected lines of three integers"):
        load_ijb(root)
    (root / "meta" / "ijbb_name_5pts_score.txt").write_text(lmk.replace("2.jpg", "99.jpg"))
    with pytest.raises(DataError, match="list different images, e.g. 99.jpg"):
        load_ijb(root)
    with pytest.raises(DataError, match="has no ijbc_face_tid_mid.txt or ijbb_face_tid_mid.txt"):
        load_ijb(tmp_path)


def test_similarity_transform_recovers_known_transform():
    theta, scale, shift = 0.4, 1.8, np.array([13.0, -7.5])
    rot = scale * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    moved = ARCFACE_TEMPLATE @ rot.T + shift
    m = similarity_transform(moved, ARCFACE_TEMPLATE)  # maps the moved points back: the inverse transform
    inv_rot = np.linalg.inv(rot)
    # float64 (u = 1.1e-16): the 2×2 fit is well conditioned (landmarks ~20 px apart both ways), so the rotation-scale
    # block is within a few u of exact (measured 1e-16); the translation multiplies it by coordinates ~200 px (2e-14)
    assert np.allclose(m[:, :2], inv_rot, atol=1e-12) and np.allclose(m[:, 2], -inv_rot @ shift, atol=1e-10)
    # noisy landmarks: least squares beats any exact fit through a subset, and stays a similarity
    noisy = moved + np.random.default_rng(0).normal(0, 0.5, moved.shape)
    m = similarity_transform(noisy, ARCFACE_TEMPLATE)
    a, b = m[0, 0], m[1, 0]
    # a similarity by construction (to a few u); the scale of a least-squares fit to σ = 0.5 px noise on points ~20 px
    # apart is off by ~σ/20/√10 ≈ 0.4 % (0.002 of 1/1.8), and the noise is seeded: 0.0019 on every machine
    assert np.allclose(m[:, :2], [[a, -b], [b, a]]) and abs(np.hypot(a, b) - 1 / scale) < 0.01


def test_align_face_undoes_a_similarity_warp():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:112, 0:112]
    face = np.zeros((112, 112, 3))
    for k, (x, y) in enumerate(ARCFACE_TEMPLATE):  # a smooth blob on each landmark
        face[..., k % 3] += 250 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 30)
    face = np.clip(face + rng.uniform(0, 5, face.shape), 0, 255).astype(np.uint8)
    theta, scale, shift = -0.25, 1.6, np.array([40.0, 25.0])
    fwd = np.c_[scale * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]), shift]
    crop = warp_affine(face, fwd, (260, 240))  # the face as a detector's loose crop would show it
    landmarks = ARCFACE_TEMPLATE @ fwd[:, :2].T + fwd[:, 2]
    aligned = align_face(crop, landmarks)
    diff = np.abs(aligned.astype(float) - face)[8:-8, 8:-8]
    # two bilinear resamplings (warp, then align) blur the 0-5 noise and the blobs' slopes: a grey level or so on
    # average, tens at most on the steepest pixels; a wrong transform would move whole blobs (differences ~250)
    assert aligned.shape == (112, 112, 3) and diff.mean() < 2.0 and diff.max() < 40
    # Exact: the fit of the template to itself is the identity to ~1e-13 px, so every bilinear sample is its own pixel
    # within far less than the 0.5 that would change the rounding back to uint8.
    assert np.array_equal(align_face(face, ARCFACE_TEMPLATE), face)


def test_warp_affine_matches_cv2_pixel_convention():
    img = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out = warp_affine(img, np.array([[1.0, 0, 0.5], [0, 1.0, 2.0]]), (40, 30))  # dst = src + (0.5, 2)
    ref = (img[:-2, :-1].astype(float) + img[:-2, 1:]) / 2  # dst(x, y) = mean of src(x-1, y-2), src(x, y-2)
    assert np.abs(out[2:, 1:].astype(float) - ref).max() <= 0.5  # the uint8 result rounds a half-integer mean
    assert (out[:2] == 0).all()  # border 0


@pytest.mark.parametrize("flip,norm_score,detector_score", [(True, True, True), (False, False, False)])
def test_evaluate_ijb_matches_hand_computation(ijb_root, tmp_path, flip, norm_score, detector_score):
    model = _model()
    # plot only once: importing matplotlib costs ~2 s
    result = evaluate_ijb(
        model,
        ijb_root,
        tmp_path,
        batch_size=4,
        flip=flip,
        norm_score=norm_score,
        detector_score=detector_score,
        plot=flip,
    )
    expected = _hand_scores(ijb_root, model, flip, norm_score, detector_score)
    scores = np.load(result["paths"]["scores"])
    # Cosines (≤ 1) of the same float32 embeddings computed in batches of 4 and of 1: each 588-term Linear output is
    # off by ~√588·u ≈ 1.5e-6 of its scale at most in practice (u = 2⁻²⁴; measured 1.2e-7 on the scores), 1e-5 allows
    # it. No two pair scores lie within 2e-5 of each other, so both rank the pairs alike and the TARs below are the
    # same count ratios (pytest.approx's default only absorbs the last bit).
    assert np.allclose(scores, expected, rtol=0, atol=1e-5)
    assert np.diff(np.sort(expected)).min() > 2e-5
    labels = np.array([y for *_, y in PAIRS])
    want = tar_at_far(expected, labels)
    assert result["tar_at_far"] == pytest.approx({str(far): tar for far, tar in want.items()})
    # by hand: a FAR far below 1/7 snaps to FPR 0, i.e. the genuine pairs scoring above every impostor pair
    assert result["tar_at_far"]["1e-06"] == np.mean(expected[labels == 1] > expected[labels == 0].max())
    assert result["num_templates"] == 5 and result["num_pairs"] == 9 and result["num_genuine"] == 2
    assert json.loads((tmp_path / "ijb_result.json").read_text())["tar_at_far"] == result["tar_at_far"]
    assert (tmp_path / "roc.png").is_file() == flip


def test_embedding_resumes_after_interruption(ijb_root, tmp_path):
    proto = load_ijb(ijb_root)
    images = IJBImages(proto)
    model = _model()

    class Interrupted(Exception):
        pass

    calls = {"n": 0}

    def forward(x, stop_after=None):
        calls["n"] += 1
        if stop_after is not None and calls["n"] > stop_after:
            raise Interrupted
        return model(x)

    full = np.array(embed_images_resumable(model, images, tmp_path / "full", "k", batch_size=2))
    with pytest.raises(Interrupted):  # 3 batches (6 calls with flip) done, dies in the 4th
        embed_images_resumable(lambda x: forward(x, 6), images, tmp_path / "run", "k", batch_size=2, save_every=1)
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["done"] == 6 and progress["dim"] == 16
    calls["n"] = 0
    resumed = embed_images_resumable(forward, images, tmp_path / "run", "k", batch_size=2, save_every=1)
    assert calls["n"] == 2 * 4  # the 7 remaining images in 4 batches, flipped and not
    # Bit for bit: the resumed rows come from the same batches of 2 (the cut falls on a batch edge) through the same
    # model in this process, so the same kernels on the same shapes; the memmap stores the floats themselves.
    assert np.array_equal(np.asarray(resumed), full)
    calls["n"] = 0
    again = embed_images_resumable(forward, images, tmp_path / "run", "k", batch_size=2)
    assert calls["n"] == 0 and np.array_equal(np.asarray(again), full)  # complete: nothing re-embedded
    embed_images_resumable(forward, images, tmp_path / "run", "other-model", batch_size=4)
    assert calls["n"] == 2 * 4  # another key starts over: 13 images in 4 batches
