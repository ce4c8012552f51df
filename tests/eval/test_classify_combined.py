"""``classify_bundle`` with the TH-KD paper's combined prediction p′ = (1 − α)·p_s + α·p_th (issue 14, item 2)."""

import pytest
import torch

from edgekd.bundle import Bundle
from edgekd.data.transforms import normalize
from edgekd.eval.report import classify_bundle
from edgekd.heads import create_head
from edgekd.models import create_model


class _Images(torch.utils.data.Dataset):
    def __init__(self, n=48, classes=5):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.fixture
def setup():
    torch.manual_seed(0)
    backbone = create_model("cnn_tiny", input_size=16, in_chans=1, embed_dim=8).eval()
    bundle = Bundle(backbone=backbone, head=create_head("linear", 8, 5))
    teacher_head = create_head("linear", 8, 5)
    with torch.no_grad():
        teacher_head.weight.mul_(30.0)  # a head that disagrees with the student's on many images
    return bundle, teacher_head, _Images()


def _expected_top1(bundle, teacher_head, data, alpha):
    """p′ by float64 torch, every image at once (the function under test batches and mixes in numpy)."""
    with torch.no_grad():
        z = bundle.backbone(normalize(data.x, bundle.cfg.mean, bundle.cfg.std)).double()
        p_s = torch.softmax(torch.nn.functional.linear(z, bundle.head.weight.double(), bundle.head.bias.double()), 1)
        p_th = torch.softmax(torch.nn.functional.linear(z, teacher_head.weight.double(), teacher_head.bias.double()), 1)
    mixed = (1 - alpha) * p_s + alpha * p_th
    # classify_bundle computes the same argmax from float32 embeddings of batches of 16 (not of 48) and float32
    # softmaxes: z may differ by a few ulps, a logit (8 terms of |z| ≤ 0.3 and rows up to 30 × the init) by ≲ 1e-5
    # and a probability by about as much. Every image's top two classes are further apart than 1e-4, so both pick
    # the same class and the top-1 rates are the same count over 48 (hence pytest.approx's default 1e-6).
    top2 = mixed.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4
    return mixed.argmax(1).eq(data.y).double().mean().item()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_combined_prediction_top1_matches_the_formula(setup, alpha):
    bundle, teacher_head, data = setup
    result = classify_bundle(bundle, data, device="cpu", batch_size=16, shared_head=teacher_head, alpha=alpha)
    assert result["top1_p′"] == pytest.approx(_expected_top1(bundle, teacher_head, data, alpha))
    assert result["top1"] == pytest.approx(_expected_top1(bundle, teacher_head, data, 0.0))


def test_the_two_heads_disagree_so_the_test_can_tell_them_apart(setup):
    bundle, teacher_head, data = setup
    assert _expected_top1(bundle, teacher_head, data, 0.0) != _expected_top1(bundle, teacher_head, data, 1.0)
    assert "top1_p′" not in classify_bundle(bundle, data, device="cpu")
