"""Margin heads against float64 trigonometry: ArcFace cos(θ+m) with its θ+m>π fallback, CosFace cos θ − m.

The formulas in edgekd.heads.margin are the one definition (the blocked backends take ``margin_phi`` from it;
tests/kernels/test_margin_rows.py checks their rows against it), so here they meet an independent computation:
θ = arccos c in float64 on a grid that crosses the fallback switch.
"""

import math

import pytest
import torch

from edgekd.errors import EdgekdError
from edgekd.heads import HEAD_KINDS, HeadSpec, create_head
from edgekd.heads.margin import margin_logits, margin_phi, margin_target


def arcface_by_angle(c: float, m: float) -> float:
    """cos(θ + m) with θ = arccos c, switching to the linear fallback once θ + m > π."""
    theta = math.acos(c)
    return math.cos(theta + m) if theta + m <= math.pi else c - m * math.sin(m)


def arcface_slope(c: float, m: float) -> float:
    """d/dc of cos(arccos c + m) = cos m + c·sin m / sqrt(1 − c²); slope 1 in the fallback region."""
    if math.acos(c) + m > math.pi:
        return 1.0
    return math.cos(m) + c * math.sin(m) / math.sqrt(1 - c * c)


# Per head kind: the target cosine after the margin and its slope (no margin: the identity).
EXPECTED = {
    "linear": (lambda c, m: c, lambda c, m: 1.0),
    "cosine": (lambda c, m: c, lambda c, m: 1.0),
    "arcface": (arcface_by_angle, arcface_slope),
    "cosface": (lambda c, m: c - m, lambda c, m: 1.0),
}
COSINES = [-0.999, -0.95, -0.9, -0.8, -0.3, 0.0, 0.2, 0.7, 0.95, 0.999]
MARGINS = [0.2, 0.5, 1.2]


def grid(m: float) -> list[float]:
    """COSINES plus a row just either side of ArcFace's switch cos(π − m) = −cos m, where φ jumps."""
    return sorted([*COSINES, -math.cos(m) - 1e-9, -math.cos(m) + 1e-9])


@pytest.mark.parametrize("m", MARGINS)
def test_grid_has_rows_on_both_sides_of_the_fallback_switch(m):
    past = [c for c in grid(m) if math.acos(c) + m > math.pi]
    assert 2 <= len(past) <= len(grid(m)) - 2, past


@pytest.mark.parametrize("m", MARGINS)
@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_margin_value_and_gradient_match_trigonometry(kind, m):
    """φ and autograd's dφ/dc against θ = arccos c; ``margin_phi``'s own dφ/dc equals the autograd (exact gradients)."""
    values = grid(m)
    value_of, slope_of = EXPECTED[kind]
    c = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    phi = margin_target(c, HeadSpec(kind, s=64.0, m=m))
    (grad,) = torch.autograd.grad(phi.sum(), c)
    phi_too, dphi = margin_phi(c.detach(), kind, m)
    assert torch.equal(phi_too, phi.detach())  # margin_target is margin_phi's [0]: the same ops on the same tensor
    # float64 (u = 2⁻⁵³ ≈ 1.1e-16) against another formula (arccos, then cos): values of size ≤ 2.2 agree to a few u,
    # and arccos's slope 1/sin θ (≤ 23 at |c| = 0.999) amplifies c's rounding: ≤ 1e-14, allowed 1e-12. The slopes
    # divide by sqrt(1 − c²), whose cancellation at |c| = 0.999 costs 1/(1 − c²) ≈ 500 u relative: ≈ 6e-14, allowed
    # 1e-9 (slope of the reference) and 1e-12 (two float64 orders of the same derivative).
    for i, value in enumerate(values):
        assert phi[i].item() == pytest.approx(value_of(value, m), abs=1e-12), value
        assert grad[i].item() == pytest.approx(slope_of(value, m), rel=1e-9), value
        assert dphi[i].item() == pytest.approx(grad[i].item(), rel=1e-12, abs=1e-15), value


@pytest.mark.parametrize("m", MARGINS)
def test_arcface_stays_finite_at_cos_plus_minus_one(m):
    """At θ = 0 the sine is clamped (SIN2_EPS), so φ ≈ cos m with a finite slope; θ = π lies in the fallback."""
    c = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    phi = margin_target(c, HeadSpec("arcface", m=m))
    (grad,) = torch.autograd.grad(phi.sum(), c)
    _, dphi = margin_phi(c.detach(), "arcface", m)
    assert phi[0].item() == pytest.approx(math.cos(m), abs=2e-6)  # the clamp moves it by sqrt(SIN2_EPS)·sin m
    assert phi[1].item() == pytest.approx(-1.0 - m * math.sin(m), abs=1e-12)  # the fallback c − m·sin m: a few u
    # Exact: at c = 1 the clamp zeroes the sine's share, both give cos m; at c = −1 the fallback's slope is 1 in both.
    assert torch.isfinite(grad).all() and torch.equal(dphi, grad)


def test_cosface_subtracts_margin_and_passes_gradient():
    spec = HeadSpec("cosface", s=64.0, m=0.4)
    c = torch.tensor(COSINES, dtype=torch.float64, requires_grad=True)
    margin_target(c, spec).sum().backward()
    # Exact: margin_phi computes cos − m, the same one rounded subtraction per entry, and its slope is the constant 1.
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
            # float64: the 8-term cosines are the same computation; arccos/cos adds a few u, times s = 30: ~1e-14
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
