"""Every loss term of the reference backend against an independent float64 computation (numpy), and gradients
against finite differences (``torch.autograd.gradcheck``)."""

import numpy as np
import pytest
import torch

from edgekd.errors import EdgekdError
from edgekd.heads import HEAD_KINDS, HeadSpec, default_margin
from edgekd.losses import LossWeights, shared_head_loss

B, D, C = 6, 5, 9


def _inputs(seed=0, linear=False):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    z_s, z_t, W_s, W_t = make(B, D), make(B, D), make(C, D), make(C, D)
    b_s, b_t = (make(C), make(C)) if linear else (None, None)
    labels = torch.randint(0, C, (B,), generator=g)
    return z_s, z_t, W_s, W_t, b_s, b_t, labels


def _np_logits(z, W, b, spec, labels=None):
    z, W = z.detach().numpy(), W.detach().numpy()
    if spec.kind == "linear":
        return z @ W.T + (0 if b is None else b.detach().numpy())
    cos = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T
    if labels is not None and spec.kind in ("arcface", "cosface"):
        for i, y in enumerate(labels.tolist()):
            if spec.kind == "cosface":
                cos[i, y] -= spec.m
            else:
                theta = np.arccos(cos[i, y])
                cos[i, y] = np.cos(theta + spec.m) if theta + spec.m <= np.pi else cos[i, y] - spec.m * np.sin(spec.m)
    return spec.s * cos


def _np_ce(logits, labels):
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -np.mean(logp[np.arange(len(labels)), labels.numpy()])


def _np_kd(l_t, l_s, T):
    def log_softmax(x):
        x = x / T
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    lt, ls = log_softmax(l_t), log_softmax(l_s)
    return T * T * np.mean(np.sum(np.exp(lt) * (lt - ls), axis=1))


@pytest.mark.parametrize(
    "spec", [HeadSpec(kind, s=8.0, m=default_margin(kind)) for kind in HEAD_KINDS], ids=lambda s: s.kind
)
def test_each_term_matches_numpy_float64(spec):
    z_s, z_t, W_s, W_t, b_s, b_t, labels = _inputs(linear=spec.kind == "linear")
    weights = LossWeights(ce=1, kd=1, th_ce=1, th_kd=1, l2e=1, T=3.0, T_th=2.0)
    total, terms = shared_head_loss(
        z_s, labels, W_s=W_s, b_s=b_s, W_t=W_t, b_t=b_t, z_t=z_t, head=spec, weights=weights, backend="reference"
    )
    l_t = _np_logits(z_t, W_t, b_t, spec)
    expected = {
        "ce": _np_ce(_np_logits(z_s, W_s, b_s, spec, labels), labels),
        "kd": _np_kd(l_t, _np_logits(z_s, W_s, b_s, spec), 3.0),
        "th_ce": _np_ce(_np_logits(z_s, W_t, b_t, spec, labels), labels),
        "th_kd": _np_kd(l_t, _np_logits(z_s, W_t, b_t, spec), 2.0),
    }
    zs, zt = z_s.numpy(), z_t.numpy()
    zs, zt = zs / np.linalg.norm(zs, axis=1, keepdims=True), zt / np.linalg.norm(zt, axis=1, keepdims=True)
    expected["l2e"] = np.mean(np.sum((zs - zt) ** 2, axis=1))
    assert set(terms) == set(expected)
    # float64 both (u = 1.1e-16), numpy against torch: 5-term dot products, 9-class log-sum-exps of logits ≤ s = 8, and
    # arccos on the ArcFace target: a few u times the terms' size, ≲ 1e-14; kd can be small (a difference of two
    # log-softmaxes), hence 1e-12 absolute beside 1e-10 relative.
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-10, abs=1e-12), name
    assert total.item() == pytest.approx(sum(expected.values()), rel=1e-10)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_gradients_match_finite_differences(kind):
    spec = HeadSpec(kind, s=4.0, m={"arcface": 0.5, "cosface": 0.3}.get(kind, 0.0))
    z_s, z_t, W_s, W_t, b_s, b_t, labels = _inputs(seed=1, linear=kind == "linear")
    weights = LossWeights(ce=0.7, kd=0.4, th_ce=0.5, th_kd=0.3, l2e=0.2, T=2.0)
    z_s.requires_grad_(True)
    W_s.requires_grad_(True)
    inputs = [z_s, W_s] + ([b_s.requires_grad_(True)] if b_s is not None else [])

    def loss(*args):
        zs, ws = args[0], args[1]
        bs = args[2] if len(args) > 2 else None
        return shared_head_loss(
            zs, labels, W_s=ws, b_s=bs, W_t=W_t, b_t=b_t, z_t=z_t, head=spec, weights=weights, backend="reference"
        )[0]

    # float64 central differences with step 1e-6: truncation ~eps²·|f‴| ≈ 1e-12 (s = 4 keeps f‴ modest), rounding
    # ~u·|f|/eps ≈ 1e-9; atol 1e-6 is far above both and far below a wrong derivative.
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6)


def test_teacher_side_gets_no_gradient():
    z_s, z_t, W_s, W_t, _, _, labels = _inputs()
    for t in (z_s, z_t, W_s, W_t):
        t.requires_grad_(True)
    total, _ = shared_head_loss(
        z_s,
        labels,
        W_s=W_s,
        W_t=W_t,
        z_t=z_t,
        head=HeadSpec("arcface", s=8.0),
        weights=LossWeights(ce=1, kd=1, th_ce=1, th_kd=1, l2e=1),
        backend="reference",
    )
    total.backward()
    assert z_t.grad is None and W_t.grad is None
    assert z_s.grad is not None and W_s.grad is not None


def test_zero_weight_terms_are_not_computed():
    z_s, z_t, W_s, W_t, _, _, labels = _inputs()
    _, terms = shared_head_loss(
        z_s, labels, W_s=W_s, head=HeadSpec("arcface"), weights=LossWeights(ce=1), backend="reference"
    )
    assert list(terms) == ["ce"]


def test_missing_inputs_are_one_line_errors():
    z_s, z_t, W_s, W_t, _, _, labels = _inputs()
    spec = HeadSpec("arcface")
    with pytest.raises(EdgekdError, match="need the teacher head"):
        shared_head_loss(z_s, labels, W_s=W_s, head=spec, weights=LossWeights(ce=1, th_ce=1), backend="reference")
    with pytest.raises(EdgekdError, match="build the student at the teacher's width"):
        shared_head_loss(
            z_s,
            labels,
            W_s=W_s,
            W_t=torch.randn(C, D + 1, dtype=torch.float64),
            z_t=z_t,
            head=spec,
            weights=LossWeights(ce=1, th_ce=1),
            backend="reference",
        )
    with pytest.raises(EdgekdError, match="unknown loss backend"):
        shared_head_loss(z_s, labels, W_s=W_s, head=spec, weights=LossWeights(ce=1), backend="magic")
    with pytest.raises(EdgekdError, match="must be a finite number"):
        LossWeights(ce=float("nan"))


def test_compiled_single_term_loss_keeps_its_gradient():
    # Regression: inductor (torch 2.14) dropped the total's grad_fn when the loss returned ``term.detach()`` beside
    # a total that simplifies to the same buffer (one term with weight 1), so a compiled vanilla run trained nothing.
    torch._dynamo.reset()
    lin = torch.nn.Linear(D, D)
    W = torch.randn(C, D, requires_grad=True)

    def step(x, labels):
        return shared_head_loss(
            lin(x), labels, W_s=W, head=HeadSpec("arcface", s=8.0), weights=LossWeights(ce=1), backend="reference"
        )

    total, terms = torch.compile(step)(torch.randn(B, D), torch.arange(B) % C)
    assert total.grad_fn is not None
    total.backward()
    assert W.grad is not None and lin.weight.grad is not None
    assert terms["ce"].item() == pytest.approx(total.item())  # total = 1·ce: equal up to a float32 rounding (≪ 1e-6)


@pytest.mark.parametrize(
    "weights, text",
    [
        (LossWeights(), "ce 1"),
        (LossWeights(ce=1, kd=1, T=4), "ce 1, kd 1, T 4"),
        (LossWeights(ce=0.75, kd=0.75, th_ce=0.25, th_kd=0.25), "ce 0.75, kd 0.75, th_ce 0.25, th_kd 0.25, T 4"),
        (LossWeights(ce=1, kd=1, th_kd=4, l2e=1, T=2, T_th=2), "ce 1, kd 1, th_kd 4, l2e 1, T 2"),
        (LossWeights(ce=1, kd=1, th_kd=1, T=4, T_th=2), "ce 1, kd 1, th_kd 1, T 4, T_th 2"),
        (LossWeights(ce=0, th_ce=1, th_kd=1, T=4, T_th=4), "th_ce 1, th_kd 1, T 4"),
        (LossWeights(ce=0, th_ce=1, th_kd=1, T=4, T_th=2), "th_ce 1, th_kd 1, T_th 2"),
        (LossWeights(ce=1, l2e=100, T=8), "ce 1, l2e 100"),
    ],
)
def test_describe_names_active_terms_and_the_temperatures_they_read(weights, text):
    assert weights.describe() == text
