"""Built-in synthetic identities: determinism, splits, shapes, difficulty; the synthetic spec and pair set."""

import numpy as np
import pytest
import torch

from edgekd.data import create_dataset, create_pairs, parse_synthetic_spec
from edgekd.data.synthetic import _RANGES, SyntheticIdentities, _identity_map, identity_params
from edgekd.errors import DataError


@pytest.fixture(autouse=True)
def _one_thread():
    """Rendering is many small elementwise ops: one thread avoids oversubscription on a shared CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("size", [32, 64, 112])
def test_shapes_dtypes_labels(size):
    ds = SyntheticIdentities(identities=3, images_per_identity=4, image_size=size)
    assert len(ds) == 12 and ds.num_classes == 3 and ds.image_size == size and ds.channels == 3
    img, label = ds[5]
    assert img.shape == (3, size, size) and img.dtype == torch.uint8 and label == 1
    assert [ds[i][1] for i in range(len(ds))] == ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.tensor().shape == (12, 3, size, size)
    assert 40 < ds.tensor().float().mean() < 215 and ds.tensor().float().std() > 20  # not blank
    gray = SyntheticIdentities(identities=2, images_per_identity=2, image_size=size, channels=1)
    assert gray[0][0].shape == (1, size, size)


def test_deterministic_and_order_independent():
    a = SyntheticIdentities(identities=20, images_per_identity=5, image_size=32, seed=7)
    b = SyntheticIdentities(identities=20, images_per_identity=5, image_size=32, seed=7)
    late = b[97][0].clone()  # render a later block first on b
    # Exact: the same rendering (same blocks, same shapes) twice in one process, whatever block is asked first.
    assert torch.equal(a.tensor(), b.tensor()) and torch.equal(a[97][0], late)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    c = SyntheticIdentities(identities=20, images_per_identity=5, image_size=32, seed=8)
    assert not torch.equal(a.tensor(), c.tensor()) and a.fingerprint != c.fingerprint
    # Identity k's latent draw does not depend on how many identities are asked for; its layout parameters agree to
    # rounding only: the (count, 16) x (16, 39) product may be blocked differently by BLAS for another count (1 ulp
    # seen on AMD EPYC). Each sum of 16 products lies within γ₁₆·Σ|z_i a_i| of the exact one (γ_n = n·u/(1 − n·u),
    # u = 2⁻⁵³), so two orders differ by at most twice that; the sigmoid's slope is ≤ 1/4 and the range scales it.
    z, a = np.random.default_rng([7, 0]).standard_normal((20, 16)), _identity_map()[0]
    u = 2.0**-53
    gamma16 = 16 * u / (1 - 16 * u)
    bound = 2 * gamma16 * (np.abs(z[:5]) @ np.abs(a).T) / 4 * (_RANGES[:, 1] - _RANGES[:, 0])
    assert np.all(np.abs(identity_params(7, 0, 5) - identity_params(7, 0, 20)[:5]) <= bound)


def test_splits_share_or_separate_identities():
    train = identity_params(0, 0, 300)
    held = identity_params(0, 1, 300)
    gaps = np.abs(train[:, None, :] - held[None, :, :]).max(-1)  # Chebyshev distance, train x held-out
    # no held-out identity repeats a training identity: 600 independent draws of 39 parameters, so the closest pair
    # is still far apart in its largest coordinate (rounding moves them by ~1e-16)
    assert gaps.min() > 1e-3
    kw = dict(identities=4, images_per_identity=3, image_size=32, seed=0)
    splits = {s: SyntheticIdentities(split=s, **kw) for s in ("train", "val", "test", "heldout")}
    fps = {ds.fingerprint for ds in splits.values()}
    assert len(fps) == 4
    for s in ("val", "test", "heldout"):
        assert not torch.equal(splits[s].tensor(), splits["train"].tensor())
    # val/test show the training identities: at difficulty 0 the images repeat exactly (the same identity parameters
    # from the same (4, 16) x (16, 39) product, rendered by the same code: bit for bit).
    clean = {s: SyntheticIdentities(split=s, difficulty=0.0, **kw).tensor() for s in ("train", "test", "heldout")}
    assert torch.equal(clean["train"], clean["test"]) and not torch.equal(clean["train"], clean["heldout"])


def _ncm_accuracy(difficulty):
    ds = SyntheticIdentities(identities=50, images_per_identity=20, image_size=32, seed=0, difficulty=difficulty)
    x = ds.tensor().float().view(50, 20, -1) / 255
    means = x[:, :10].mean(1)  # class means from 10 images, tested on the other 10
    pred = torch.cdist(x[:, 10:].reshape(500, -1), means).argmin(1)
    return (pred == torch.arange(50).repeat_interleave(10)).float().mean().item()


def test_difficulty_nearest_class_mean_on_pixels():
    assert _ncm_accuracy(0.0) > 0.95  # no nuisances: every image of an identity is the same
    acc = _ncm_accuracy(1.0)
    assert 0.05 < acc < 0.5  # chance is 0.02: identity shows through the nuisances, but pixels are not enough


def test_synthetic_spec_and_errors():
    assert parse_synthetic_spec("synthetic:identities=30,difficulty=0.5,image-size=32") == {
        "identities": 30,
        "difficulty": 0.5,
        "image_size": 32,
    }
    ds = create_dataset(
        "synthetic:identities=3,images_per_identity=2,image_size=64,pairs=40", split="val", image_size=32, seed=None
    )
    assert isinstance(ds, SyntheticIdentities) and ds.split == "val" and ds.image_size == 64 and len(ds) == 6
    with pytest.raises(DataError, match="bad synthetic option"):
        create_dataset("synthetic:colour=3")
    with pytest.raises(DataError, match="not a valid int"):
        create_dataset("synthetic:identities=many")
    with pytest.raises(DataError, match="split"):
        SyntheticIdentities(split="dev")
    with pytest.raises(DataError, match="neither a built-in name"):
        create_dataset("no-such-data-anywhere")
    with pytest.raises(DataError, match="not synthetic"):
        create_pairs("fmnist")


def test_synthetic_pairs_balanced_deterministic_and_correct():
    spec = "synthetic:identities=500,pairs=60,pair_identities=12,pair_images=4,image_size=32,seed=3"
    a, b = create_pairs(spec), create_pairs(spec)
    assert len(a) == 60 and a.num_genuine == 30 and a.issame[:4].tolist() == [True, False, True, False]
    assert a.images.shape == (120, 3, 32, 32) and a.images.dtype == torch.uint8 and a.name == "synthetic"
    assert torch.equal(a.images, b.images) and a.fingerprint == b.fingerprint  # the same rendering twice: exact
    for fold in np.split(a.issame, 10):
        assert fold.sum() == 3  # every contiguous fold of the 10-fold protocol is balanced
    # At difficulty 0 all images of an identity are identical (one parameter row, rendered alike): genuine pairs
    # match pixel for pixel.
    clean = create_pairs(spec + ",difficulty=0")
    same = [torch.equal(clean.images[2 * i], clean.images[2 * i + 1]) for i in range(len(clean))]
    assert same == clean.issame.tolist()
    # Held-out identities never appear in training data with the same seed.
    train = SyntheticIdentities(identities=50, images_per_identity=1, image_size=32, seed=3, difficulty=0.0)
    flat = train.tensor().flatten(1)
    assert not any((flat == img.flatten()).all(1).any() for img in clean.images)
