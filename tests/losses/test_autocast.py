"""The shared-head loss under bf16 autocast: every backend, inside a compiled training step, against float64.

On CUDA ``fit`` runs every step under bf16 autocast, and a custom op's body sees the caller's autocast state (also in
a compiled step). CPU autocast reproduces that here. The loss is defined not to follow autocast
(``edgekd.losses.shared_head``, "Precision"): the backbone's bf16 embedding is promoted exactly to the head's float32
and the terms are float32 math. So the float64 reference is evaluated on the step's own bf16 embedding, and:

- the loss and the head's gradient differ from it by float32 rounding only (the tolerance of the float32 backend
  tests, 2e-5 of the largest value);
- the backbone's gradient ``dzᵀ x`` is formed by autocast in bf16: ``dz`` is rounded to bf16 on its way back
  through the cast (relative error ≤ u = 2⁻⁸, bf16's unit roundoff), the product accumulates in float32 and its
  result is rounded to bf16 (≤ u again). Each entry is therefore within ``2u·(|dz|ᵀ|x|)`` plus float32 noise of the
  float64 value; the test allows ``3u·(|dz|ᵀ|x|)`` (the third u covers the float32 accumulation and dz's own float32
  rounding, both far smaller).
"""

from __future__ import annotations

import pytest
import torch

from edgekd.heads import HeadSpec
from edgekd.kernels import interpreting
from edgekd.losses import LossWeights, list_loss_backends, resolve_backend, shared_head_loss

BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
FP32_TOL = 2e-5  # float32 rounding, relative to the largest value: TOL[float32] of test_shared_head_backends.py
HEAD = HeadSpec("arcface", 16.0, 0.5)
WEIGHTS = LossWeights(ce=1.0, kd=0.5, th_ce=0.3, th_kd=0.2, l2e=0.1, T=4.0, T_th=2.0)
BACKENDS = [name for name in list_loss_backends() if name != "auto"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    backbone = torch.nn.Linear(12, 24, bias=False)
    with torch.no_grad():
        backbone.weight.copy_(torch.randn(24, 12, generator=g) * 0.3)
    W_s = torch.nn.Parameter(torch.randn(50, 24, generator=g) * 0.1)
    W_t = torch.randn(50, 24, generator=g) * 0.1
    x, z_t = torch.randn(8, 12, generator=g), torch.randn(8, 24, generator=g)
    labels = torch.randint(0, 50, (8,), generator=g)
    return backbone, W_s, W_t, x, z_t, labels


def _float64_reference(z, x, W_s, W_t, z_t, labels):
    """Loss, d/dW_s and d/dbackbone.weight of the reference in float64 from the step's bf16 embedding ``z``, and the
    bf16 bound ``|dz|ᵀ|x|`` of the backbone gradient (module doc)."""
    z64 = z.double().requires_grad_()
    W64 = W_s.detach().double().requires_grad_()
    total, _ = shared_head_loss(z64, labels, W_s=W64, W_t=W_t.double(), z_t=z_t.double(), head=HEAD,
                                weights=WEIGHTS, backend="reference")  # fmt: skip
    total.backward()
    x_bf = x.bfloat16().double()  # what autocast multiplies
    return total.detach(), W64.grad, z64.grad.T @ x_bf, z64.grad.abs().T @ x_bf.abs()


@pytest.mark.slow  # one Inductor compile per backend
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_under_bf16_autocast_matches_float64(backend):
    if backend == "triton" and not (torch.cuda.is_available() or interpreting()):
        pytest.skip("triton backend needs CUDA or TRITON_INTERPRET=1 (make test sets it)")
    torch._dynamo.reset()
    resolve_backend(backend, torch.device("cpu"))  # outside the compiled step: a first load imports its module
    backbone, W_s, W_t, x, z_t, labels = _inputs()

    def step(x, z_t, labels):
        with torch.autocast("cpu", torch.bfloat16):
            z = backbone(x)
            total, _ = shared_head_loss(z, labels, W_s=W_s, W_t=W_t, z_t=z_t, head=HEAD, weights=WEIGHTS,
                                        backend=backend)  # fmt: skip
        return total, z.detach()

    total, z = torch.compile(step, fullgraph=True)(x, z_t, labels)
    total.backward()
    assert z.dtype == torch.bfloat16  # the backbone did run under autocast
    assert total.dtype == torch.float32
    ref_total, ref_dW_s, ref_dW_b, bound = _float64_reference(z, x, W_s, W_t, z_t, labels)
    assert abs(total.item() - ref_total.item()) <= FP32_TOL * max(1.0, abs(ref_total.item()))
    assert (W_s.grad.double() - ref_dW_s).abs().max() <= FP32_TOL * ref_dW_s.abs().max()
    err = (backbone.weight.grad.double() - ref_dW_b).abs()
    assert (err <= 3 * BF16_U * bound + FP32_TOL * ref_dW_b.abs().max()).all(), (err / bound).max()
