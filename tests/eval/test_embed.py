"""embed_images flip-sum semantics against a manual computation, and evaluate_pairs end to end."""

import numpy as np
import pytest
import torch
from torch import nn

from edgekd.data.pairs import PairSet
from edgekd.eval.embed import embed_images, evaluate_pairs

U = 2.0**-24  # float32 unit roundoff


def _tiny_linear(c=3, s=6, d=5):
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * s * s, d)).eval()


def _abs_terms(model, x) -> np.ndarray:
    """Σ|terms| of each output of the Linear on ``x`` (float64): ``|x| @ |W|ᵀ + |b|``, what its rounding scales with."""
    w, b = model[1].weight.detach().double(), model[1].bias.detach().double()
    return (x.double().flatten(1).abs() @ w.abs().T + b.abs()).numpy()


def test_embed_images_flip_sum_matches_manual():
    model = _tiny_linear()
    images = torch.randint(0, 256, (7, 3, 6, 6), dtype=torch.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = (images.double() / 255 - m.double()) / s.double()
    w, b = model[1].weight.detach().double(), model[1].bias.detach().double()
    plain = x.flatten(1) @ w.T + b
    flipped = x.flip(-1).flatten(1) @ w.T + b
    out = embed_images(model, images, batch_size=3, flip=True, mean=mean, std=std)  # batches 3, 3, 1
    assert out.shape == (7, 5) and out.dtype == np.float32
    # float32 against float64: normalizing rounds each input by ≤ 4u of X = (|v/255| + |mean|)/std (three operations
    # and the float32 mean and std), and the K = 108-term product with its bias rounds by ≤ γ₁₀₉ ≈ 109u of Σ|terms|:
    # each output is within (109 + 4)·u·(|X| @ |W|ᵀ + |b|) to first order; the flip sum adds its two bounds and one u
    # of the sum (measured: ≤ 0.5u of Σ|terms|).
    X = (images.double() / 255 + m.double()) / s.double()
    bound, bound_flip = ((109 + 5) * U * _abs_terms(model, v) for v in (X, X.flip(-1)))
    assert np.all(np.abs(out - (plain + flipped).numpy()) <= bound + bound_flip + U * np.abs(out))
    no_flip = embed_images(model, images, batch_size=4, flip=False, mean=mean, std=std)
    assert np.all(np.abs(no_flip - plain.numpy()) <= bound)


def test_embed_images_accepts_datasets_and_numpy_forwards():
    model = _tiny_linear(c=1, s=4, d=3)
    images = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    dataset = [(img, 0) for img in images]  # any indexable of (image, label) items

    def numpy_forward(x):  # as an ONNX Runtime wrapper would return
        return model(x).detach().numpy()

    a = embed_images(model, images, batch_size=2, mean=0.5, std=0.5)
    b = embed_images(numpy_forward, dataset, batch_size=3, mean=0.5, std=0.5)
    # The same float32 inputs in batches of 2 and of 3: the 16-term products may be summed in other orders (1 ulp
    # apart on an AMD EPYC), each within γ₁₇ ≈ 17u of Σ|terms| of the exact value, so at most twice that apart.
    x = (images.float() / 255 - 0.5) / 0.5
    assert np.all(np.abs(a - b) <= 2 * 17 * U * _abs_terms(model, x))


def test_embed_images_rejects_bad_output():
    with pytest.raises(ValueError, match="expected"):
        embed_images(lambda x: x, torch.zeros(2, 3, 4, 4, dtype=torch.uint8))


def test_evaluate_pairs_separable_pairs():
    # Genuine pairs are the same image twice; impostor pairs are unrelated images: a pixel "embedding" separates them.
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=gen)
    issame = np.arange(20) % 2 == 0
    images = torch.stack(
        [imgs[2 * i + (0 if s else 1)] if k else imgs[2 * i] for i, s in enumerate(issame) for k in (0, 1)]
    )
    pairs = PairSet(images, issame, name="toy")
    res = evaluate_pairs(nn.Flatten(), pairs, mean=0.5, std=0.5, batch_size=16)
    assert res["name"] == "toy" and res["pairs"] == 20
    assert res["accuracy"] == 1.0 and res["std"] == 0.0
    assert all(v == 1.0 for v in res["tar_at_far"].values())
    assert res["fpr"][0] == 0 and res["thresholds"][0] == np.inf and len(res["fpr"]) == len(res["tpr"])


def test_embed_batches_normalizes_uint8_or_takes_normalized_batches():
    from edgekd.eval.embed import embed_batches

    model = _tiny_linear()
    images = torch.randint(0, 256, (7, 3, 6, 6), dtype=torch.uint8)
    x = (images.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        expected = model(x).numpy() + model(x.flip(-1)).numpy()
    from_uint8 = list(embed_batches(model, images.split(3), flip=True, mean=0.5, std=0.5))
    normalized = list(embed_batches(model, x.split(3), flip=True))
    assert [len(e) for e in from_uint8] == [3, 3, 1]
    # The same float32 inputs (normalize computes (v/255 − 0.5)/0.5 as above), in batches of 3 against one of 7: two
    # orders of each 108-term product with its bias, ≤ 2·γ₁₀₉·Σ|terms|, for the image and its mirror, and each side
    # rounds its sum of the two (u of it each).
    bound = 2 * 109 * U * (_abs_terms(model, x) + _abs_terms(model, x.flip(-1))) + 2 * U * np.abs(expected)
    assert np.all(np.abs(np.concatenate(from_uint8) - expected) <= bound)
    assert np.all(np.abs(np.concatenate(normalized) - expected) <= bound)


def test_one_batched_embedding_loop_serves_eval_ijb_and_the_gates(monkeypatch, tmp_path):
    """``embed_images``, the resumable IJB pass and the export gates all run the one loop, ``embed_batches``: each
    reaches its per-batch step."""
    import edgekd.eval.embed as embed
    from edgekd.eval.ijb import embed_images_resumable
    from edgekd.export.checks.gates import run_batched

    calls = []
    step = embed._run
    monkeypatch.setattr(embed, "_run", lambda forward, x: calls.append(len(x)) or step(forward, x))
    model = _tiny_linear()
    images = torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8)
    normalized = (images.float() / 255 - 0.5) / 0.5

    ref = embed_images(model, images, batch_size=2, flip=False, mean=0.5, std=0.5)
    assert calls == [2, 2, 1]
    resumable = embed_images_resumable(
        model, list(images), tmp_path, key="k", batch_size=2, flip=False, mean=0.5, std=0.5
    )
    assert calls == [2, 2, 1] * 2
    gated = run_batched(model, normalized, 2)
    assert calls == [2, 2, 1] * 3
    # Bit for bit: one loop (embed_batches), the same model on the same batches (2, 2, 1) of the same float32 inputs
    # (normalized above exactly as normalize does), so the same kernels on the same shapes; the memmap stores floats.
    np.testing.assert_array_equal(np.asarray(resumable), ref)
    np.testing.assert_array_equal(gated, ref)
