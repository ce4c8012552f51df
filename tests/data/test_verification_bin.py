"""Verification .bin files: round trips, Python-2 style pickles, and metrics on a .bin equal to a direct computation."""

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from edgekd.cli import main
from edgekd.data import create_pairs
from edgekd.data.verification_bin import load_bin, write_bin
from edgekd.eval.embed import evaluate_pairs
from edgekd.eval.metrics import tar_at_far


def _images(n=8, size=24, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def test_png_round_trip_exact(tmp_path):
    images, issame = _images(), [True, False, False, True]
    write_bin(tmp_path / "lfw.bin", images, issame, image_format="png")
    pairs = load_bin(tmp_path / "lfw.bin")
    assert pairs.name == "lfw" and len(pairs) == 4 and pairs.num_genuine == 2
    assert torch.equal(pairs.images, images) and pairs.issame.tolist() == issame
    assert len(pairs.fingerprint) == 16 and load_bin(tmp_path / "lfw.bin").fingerprint == pairs.fingerprint


def test_jpeg_round_trip_and_resize(tmp_path):
    images = torch.full((4, 3, 32, 32), 100, dtype=torch.uint8)
    images[:, 0] = 200
    write_bin(tmp_path / "x.bin", images, np.array([True, False]))
    pairs = load_bin(tmp_path / "x.bin")
    assert (pairs.images.int() - images.int()).abs().max() <= 3  # JPEG of flat colours: a few grey levels at most
    small = load_bin(tmp_path / "x.bin", image_size=16)
    assert small.images.shape == (4, 3, 16, 16) and small.fingerprint != pairs.fingerprint


def test_reads_python2_style_pickle(tmp_path):
    """insightface files: protocol 2, str payloads (bytes under encoding='bytes'), numpy bools in issame_list."""
    bins = []
    for seed in range(4):
        buf = io.BytesIO()
        Image.fromarray(_images(1, 16, seed)[0].permute(1, 2, 0).numpy()).save(buf, format="PNG")
        bins.append(buf.getvalue())
    issame = [np.bool_(True), np.bool_(False)]
    (tmp_path / "agedb_30.bin").write_bytes(pickle.dumps((bins, issame), protocol=2))
    pairs = load_bin(tmp_path / "agedb_30.bin")
    assert pairs.images.shape == (4, 3, 16, 16) and pairs.issame.tolist() == [True, False]
    assert torch.equal(pairs.images[2], _images(1, 16, 2)[0])
    # already-encoded images are written byte for byte
    write_bin(tmp_path / "copy.bin", bins, [True, False])
    with open(tmp_path / "copy.bin", "rb") as f:
        assert pickle.load(f, encoding="bytes") == (bins, [True, False])


def _direct_10fold(a, b, issame, nfolds=10):
    """Textbook version: per fold, the threshold (0..4 step 0.01, first best) maximizing accuracy on the others."""
    thresholds = np.arange(0, 4, 0.01)
    dist = ((a - b) ** 2).sum(1)
    n = len(dist)
    sizes = [n // nfolds + (1 if i < n % nfolds else 0) for i in range(nfolds)]
    accs, start = [], 0
    for size in sizes:
        test = np.zeros(n, bool)
        test[start : start + size] = True
        start += size
        train_acc = [np.mean((dist[~test] < t) == issame[~test]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accs.append(np.mean((dist[test] < best) == issame[test]))
    return float(np.mean(accs)), float(np.std(accs))


def test_metrics_on_bin_equal_direct_computation(tmp_path):
    rng = np.random.default_rng(0)
    bases = rng.uniform(0, 255, (10, 3, 1, 1)) + rng.normal(0, 40, (10, 3, 32, 32))
    issame = np.arange(40) % 2 == 0
    ids = np.stack([rng.integers(0, 10, 40), rng.integers(0, 10, 40)], 1)
    ids[issame, 1] = ids[issame, 0]
    ids[~issame, 1] = (ids[~issame, 0] + rng.integers(1, 10, (~issame).sum())) % 10
    noisy = bases[ids.ravel()] + rng.normal(0, 30, (80, 3, 32, 32))
    images = torch.from_numpy(np.clip(noisy, 0, 255).astype(np.uint8))
    write_bin(tmp_path / "pairs.bin", images, issame, image_format="png")
    pairs = create_pairs(str(tmp_path / "pairs.bin"))  # the --pairs dispatch reads it with load_bin
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, 4), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 7 * 7, 16)).eval()  # fmt: skip
    result = evaluate_pairs(model, pairs, batch_size=16)
    with torch.no_grad():  # direct: the source images, normalized by hand, flip-summed, L2-normalized
        x = (images.float() / 255 - 0.5) / 0.5
        emb = (model(x) + model(torch.flip(x, dims=[3]))).double().numpy()
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    a, b = emb[0::2], emb[1::2]
    acc, std = _direct_10fold(a, b, issame)
    scores = (a * b).sum(1)
    # evaluate_pairs embeds in batches of 16, here all 80 at once: the float32 embeddings may differ by a few ulps
    # (~1e-7 relative), moving a squared distance (≤ 4) or a score (≤ 1) by ~1e-6. No distance lies within 1e-5 of a
    # threshold and no two scores within 1e-5 of each other, so both sides count the same pairs: the accuracies and
    # TARs are the same count ratios, their means and deviations over folds equal to float64 rounding (1e-12).
    dist = ((a - b) ** 2).sum(1)
    assert np.abs(dist[:, None] - np.arange(0, 4, 0.01)[None, :]).min() > 1e-5
    assert np.diff(np.sort(scores)).min() > 1e-5
    assert 0.5 < acc < 1 and result["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert result["std"] == pytest.approx(std, abs=1e-12)
    assert result["tar_at_far"] == pytest.approx(tar_at_far(scores, issame))


def test_cli_pack_bin(tmp_path, capsys):
    for i in range(4):
        Image.fromarray(_images(1, 16, i)[0].permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
    (tmp_path / "pairs.txt").write_text("# a b same\n0.png 1.png 1\n2.png 3.png 0\n")
    main(["data", "pack-bin", str(tmp_path / "pairs.txt"), str(tmp_path / "out.bin")])
    assert "wrote 2 pairs (1 genuine)" in capsys.readouterr().out
    pairs = load_bin(tmp_path / "out.bin")
    assert pairs.issame.tolist() == [True, False] and pairs.images.shape == (4, 3, 16, 16)
    main(["data", "verify", str(tmp_path / "out.bin")])
    assert "2 pairs, 1 genuine" in capsys.readouterr().out
    (tmp_path / "bad.txt").write_text("0.png 9.png 1\n")
    with pytest.raises(SystemExit) as info:
        main(["data", "pack-bin", str(tmp_path / "bad.txt"), str(tmp_path / "bad.bin")])
    assert info.value.code == 2 and "9.png not found" in capsys.readouterr().err
