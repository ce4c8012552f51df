"""The blocked ops (chunked, triton), row by row, against the one margin definition (edgekd.heads.margin).

Each row's embedding sits at a chosen cosine to its target class, on a grid that crosses ArcFace's fallback switch
cos(π − m) = −cos m. Per row, the op's CE log-sum-exp (its saved statistics) and its gradient of z are compared with
autograd of the reference formulas in float64 on the same fp32 values: the loss is a mean over rows, so row i of
dz depends on row i alone. tests/heads/test_margin.py checks the definition itself against trigonometry.
"""

from __future__ import annotations

import math

import pytest
import torch

from edgekd.heads import HEAD_KINDS, HeadSpec, default_margin
from edgekd.heads.margin import margin_logits
from edgekd.kernels import interpreting
from edgekd.kernels.chunked import shared_head_chunked
from edgekd.kernels.shared_head_math import LSE_CE_S, TERM_CE
from edgekd.losses.terms import cross_entropy

C, D = 40, 24


def _op(name: str):
    if name == "chunked":
        return shared_head_chunked, "cpu"
    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("the triton op needs CUDA or TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    from edgekd.kernels.shared_head_op import shared_head_triton

    return shared_head_triton, "cuda" if torch.cuda.is_available() else "cpu"


def _rows(m: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """fp32 ``z: (B, D)``, ``W: (C, D)`` and labels with row i at the i-th grid cosine to its target class."""
    switch = -math.cos(m)
    cosines = [-0.999, -0.95, switch - 2e-3, switch + 2e-3, -0.5, 0.0, 0.5, 0.95, 0.999]
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 15, 16, 17, 31, 32, 33, 38, 39])  # block edges of 16-class blocks
    z = torch.empty(len(cosines), D, dtype=torch.float64)
    for i, c in enumerate(cosines):
        w_hat = W[labels[i]] / W[labels[i]].norm()
        u = torch.randn(D, generator=g, dtype=torch.float64)
        u = u - (u @ w_hat) * w_hat
        z[i] = (0.5 + i) * (c * w_hat + math.sqrt(1 - c * c) * u / u.norm())
    return z.float(), W.float(), labels, cosines


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("name", ["chunked", "triton"])
def test_each_row_follows_the_margin_definition(name, kind):
    op, device = _op(name)
    head = HeadSpec(kind, 1.0 if kind == "linear" else 16.0, default_margin(kind))
    z, W, labels, cosines = _rows(head.m if kind == "arcface" else 0.5)
    if kind == "arcface":  # the grid crosses the switch: rows past it take the fallback
        past = [c for c in cosines if math.acos(c) + head.m > math.pi]
        assert 2 <= len(past) <= len(cosines) - 2

    z64 = z.double().requires_grad_()
    logits = margin_logits(z64, W.double(), None, labels, head)
    ce = cross_entropy(logits, labels)
    (ref_grad,) = torch.autograd.grad(ce, z64)

    zd = z.to(device).requires_grad_()
    losses, stats = op(zd, labels.to(device), W.to(device), None, zd, None, None, None, head.kind_id, head.s, head.m,
                       1.0, TERM_CE, 16)  # fmt: skip
    losses[0].backward()
    lse, grad = stats[:, LSE_CE_S].double().cpu(), zd.grad.double().cpu()

    # float32 (u = 2⁻²⁴) against float64 on the same fp32 values. A logit is s·cos (s = 16) or z·w (linear), each a
    # 24-term dot product rounded by at most γ₂₄·Σ|terms| ≈ 24u·Σ|terms| (≲ 2e-5 on logits up to ~40 here, typically
    # √24 times less); the log-sum-exp and the CE (a mean of lse − target logit, ≈ 10-18 here) move by at most that
    # (twice for the CE): 1e-5 relative and absolute. Row gradients: 1e-4 of the row's norm, because ArcFace's slope at
    # |c| = 0.999 magnifies a cosine's rounding (≈ 3e-7) by d²φ/dc² = sin m / sin³θ ≈ 5e3 (measured 2.3e-4 relative on
    # that row, whose norm is 1e-4: 3e-8 absolute), plus 1e-7 absolute for rows whose gradient is nearly zero.
    assert losses[0].item() == pytest.approx(ce.item(), rel=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(logits.detach(), 1), rtol=1e-5, atol=1e-5)
    for i in range(len(cosines)):
        err = (grad[i] - ref_grad[i]).norm().item()
        assert err <= 1e-4 * ref_grad[i].norm().item() + 1e-7, (i, cosines[i], err, ref_grad[i].norm().item())
