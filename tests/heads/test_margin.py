"""Margin heads against float64 trigonometry: ArcFace cos(θ+m) with its θ+m>π fallback, CosFace cos θ − m."""

import math

import pytest
import torch

from edgekd.errors import EdgekdError
from edgekd.heads import create_head
from edgekd.losses.terms import HeadSpec, margin_logits, margin_target


def arcface_by_angle(c: float, m: float) -> float:
    """cos(θ + m) with θ = arccos c, switching to the linear fallback once θ + m > π."""
    theta = math.acos(c)
    return math.cos(theta + m) if theta + m <= math.pi else c - m * math.sin(m)


def arcface_slope(c: float, m: float) -> float:
    """d/dc of cos(arccos c + m) = cos m + c·sin m / sqrt(1 − c²); slope 1 in the fallback region."""
    if math.acos(c) + m > math.pi:
        return 1.0
    return math.cos(m) + c * math.sin(m) / math.sqrt(1 - c * c)


COSINES = [-0.999, -0.95, -0.9, -0.8, -0.3, 0.0, 0.2, 0.7, 0.95, 0.999]


@pytest.mark.parametrize("m", [0.2, 0.5])
def test_arcface_target_value_and_gradient_match_trigonometry(m):
    spec = HeadSpec("arcface", s=64.0, m=m)
    c = torch.tensor(COSINES, dtype=torch.float64, requires_grad=True)
    phi = margin_target(c, spec)
    phi.sum().backward()
    for i, value in enumerate(COSINES):
        assert phi[i].item() == pytest.approx(arcface_by_angle(value, m), abs=1e-12)
        assert c.grad[i].item() == pytest.approx(arcface_slope(value, m), rel=1e-9)


def test_arcface_fallback_region_is_exercised():
    m = 0.5
    assert math.acos(-0.95) + m > math.pi  # -0.95 lies past the switch, -0.3 before it
    assert math.acos(-0.3) + m < math.pi


def test_cosface_subtracts_margin_and_passes_gradient():
    spec = HeadSpec("cosface", s=64.0, m=0.4)
    c = torch.tensor(COSINES, dtype=torch.float64, requires_grad=True)
    margin_target(c, spec).sum().backward()
    assert torch.equal(margin_target(c, spec).detach(), c.detach() - 0.4)
    assert torch.equal(c.grad, torch.ones_like(c))


def test_margin_logits_touch_only_the_target_column():
    torch.manual_seed(0)
    z, W = torch.randn(5, 8, dtype=torch.float64), torch.randn(7, 8, dtype=torch.float64)
    labels = torch.tensor([0, 6, 3, 3, 1])
    spec = HeadSpec("arcface", s=30.0, m=0.5)
    logits = margin_logits(z, W, None, labels, spec)
    zn, Wn = z / z.norm(dim=1, keepdim=True), W / W.norm(dim=1, keepdim=True)
    cos = (zn @ Wn.T).numpy()
    for i in range(5):
        for j in range(7):
            expected = arcface_by_angle(cos[i, j], 0.5) if j == labels[i] else cos[i, j]
            assert logits[i, j].item() == pytest.approx(30.0 * expected, abs=1e-10)


def test_head_defaults_and_linear_bias():
    assert create_head("arcface", 16, 10).spec.m == 0.5
    assert create_head("cosface", 16, 10).spec.m == 0.4
    linear = create_head("linear", 16, 10)
    assert linear.bias is not None and linear(torch.randn(3, 16)).shape == (3, 10)
    assert create_head("arcface", 16, 10).bias is None


def test_bad_head_settings_are_one_line_errors():
    with pytest.raises(EdgekdError, match="unknown head kind"):
        HeadSpec("sphereface")
    with pytest.raises(EdgekdError, match="out of range"):
        HeadSpec("arcface", m=2.0)
