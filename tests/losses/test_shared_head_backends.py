"""Every shared-head backend against the float64 reference: loss terms and gradients of z_s, z_st, W_s, b_s.

Shapes are multiples of no block size (B=37, D_s=96, D_t=64, C=1013); labels sit on block boundaries; a few rows
are placed in ArcFace's fallback region (θ + m > π) and a few just outside it. The Triton backend runs here when
it can (CUDA, or ``TRITON_INTERPRET=1`` as ``tests/conftest.py`` sets without a GPU); its own tests are
in tests/kernels. Also: the entry point's dispatch, a compiled training step without graph breaks, and the chunked
backend's measured peak memory at C=200k.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from edgekd.errors import MissingDependency
from edgekd.heads import HEAD_KINDS, HeadSpec, default_margin
from edgekd.kernels import interpreting
from edgekd.kernels.chunked import shared_head_chunked
from edgekd.kernels.shared_head_autograd import make_loss_backend
from edgekd.losses import LossWeights, list_loss_backends, load_backend, resolve_backend, shared_head_loss

# Every head kind with the field's margin (ArcFace 0.5, CosFace 0.4); the scale is 1 for linear heads.
HEADS = {kind: HeadSpec(kind, 1.0 if kind == "linear" else 64.0, default_margin(kind)) for kind in HEAD_KINDS}
BACKENDS = [name for name in list_loss_backends() if name != "auto"]
BLOCKED = [name for name in BACKENDS if name != "reference"]  # every backend but the oracle
ALL_TERMS = LossWeights(ce=1.0, kd=0.7, th_ce=0.3, th_kd=0.2, T=4.0)
ONE_TERM = {name: LossWeights(**{"ce": 0.0, name: 0.6}, T=2.0) for name in ("ce", "kd", "th_ce", "th_kd")}
GRADS = ("z_s", "W_s", "b_s", "z_st")
TRITON_RUNNABLE = torch.cuda.is_available() or interpreting()
# Relative (to the largest reference value) error bounds per input dtype, for the blocked backends (fp32 accumulation)
# against float64 on the same rounded inputs. float32 (u = 2⁻²⁴ ≈ 6e-8): a logit s·cos (s = 64) carries the rounding of
# a D-term dot product (D ≤ 96: ≲ √D·u ≈ 6e-7 typically, D·u ≈ 6e-6 at worst) times s, which the softmax passes on
# about 1:1 relative to the largest term and gradient; 2e-5 ≈ 330u (measured worst on the CPU: 1e-6). 16-bit: the
# normalized operands and the returned gradients are rounded to the input dtype (≤ u each: fp16 2⁻¹¹, bf16 2⁻⁸),
# 2e-2 ≈ 40u and 4e-2 ≈ 10u (measured on the CPU: 3e-4 and 2.4e-3, under one u).
TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 4e-2}


def _backend(name: str):
    """The registered backend, except that chunked sweeps 128-class blocks (its default takes C=1013 in one)."""
    if name == "chunked":
        return make_loss_backend(shared_head_chunked, block_c=128)  # 8 blocks over C=1013, the last partial
    if name == "triton" and not TRITON_RUNNABLE:
        pytest.skip("triton backend needs CUDA or TRITON_INTERPRET=1 (make test sets it)")
    try:
        return load_backend(name)
    except MissingDependency as exc:
        pytest.skip(str(exc))


def _device(name: str) -> torch.device:
    return torch.device("cuda" if name == "triton" and torch.cuda.is_available() else "cpu")


def _place_cos(z: torch.Tensor, w: torch.Tensor, cos: float, g: torch.Generator) -> torch.Tensor:
    """A vector with norm ‖z‖ at cosine ``cos`` to w."""
    w_hat = w / w.norm()
    u = torch.randn(w.shape, generator=g, dtype=w.dtype)
    u = u - (u @ w_hat) * w_hat
    return z.norm() * (cos * w_hat + math.sqrt(1 - cos * cos) * u / u.norm())


def make_case(B=37, D_s=96, D_t=64, C=1013, seed=0, shared_embedding=False):
    """float64 inputs; rows 0–2 in ArcFace's fallback region, rows 3–4 just outside it (m = 0.5)."""
    g = torch.Generator().manual_seed(seed)
    D_t = D_s if shared_embedding else D_t
    rand = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale  # noqa: E731
    case = {
        "z_s": rand(B, D_s),
        "W_s": rand(C, D_s, scale=0.1),
        "b_s": rand(C),
        "W_t": rand(C, D_t, scale=0.1),
        "b_t": rand(C),
        "z_t": rand(B, D_t),
        "z_st": rand(B, D_t),
    }
    labels = torch.randint(0, C, (B,), generator=g)
    boundaries = torch.tensor([0, 31, 32, 63, 64, 127, 128, 255, 256, C - 1])
    boundaries = boundaries[boundaries < C][: max(0, B - 5)]
    labels[5 : 5 + len(boundaries)] = boundaries
    for i, cos in enumerate((-0.999, -0.97, -0.9, -0.86, -0.5)[: min(B, 5)]):
        case["z_s"][i] = _place_cos(case["z_s"][i], case["W_s"][labels[i]], cos, g)
        case["z_st"][i] = _place_cos(case["z_st"][i], case["W_t"][labels[i]], cos, g)
    if shared_embedding:
        case["z_st"] = case["z_s"]
    case["labels"] = labels
    return case


def run(backend: str, case: dict, head: HeadSpec, weights: LossWeights, dtype=torch.float64, device="cpu"):
    """Weighted total, terms and input gradients of one backend; inputs rounded to ``dtype`` first."""
    leaves = {k: v.to(device=device, dtype=dtype).requires_grad_(k in GRADS) for k, v in case.items() if k != "labels"}
    if case["z_st"] is case["z_s"]:
        leaves["z_st"] = leaves["z_s"]
    b = {"b_s": leaves["b_s"], "b_t": leaves["b_t"]} if head.kind == "linear" else {"b_s": None, "b_t": None}
    terms = _backend(backend)(
        leaves["z_s"], case["labels"].to(device), leaves["W_s"], b["b_s"], leaves["z_st"], leaves["W_t"], b["b_t"],
        leaves["z_t"], head, weights,
    )  # fmt: skip
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    total.backward()
    grads = {k: None if leaves[k].grad is None else leaves[k].grad.double().cpu() for k in GRADS}
    if case["z_st"] is case["z_s"]:
        grads["z_st"] = None
    return {k: v.detach().double().cpu() for k, v in terms.items()}, grads


def assert_matches_reference(backend, case, head, weights, dtype=torch.float32, grad_floor=1e-2, device=None, tol=None):
    """Backend on ``dtype`` inputs vs the float64 reference on the same (rounded) values.

    Gradient errors are bounded by ``tol · max(max |reference|, grad_floor)``, ``tol`` defaulting to ``TOL[dtype]``;
    ``device`` defaults to where the backend runs in these tests. Returns the worst relative errors (terms, grads).
    """
    rounded = {k: v if k == "labels" else v.to(dtype).double() for k, v in case.items()}
    if case["z_st"] is case["z_s"]:
        rounded["z_st"] = rounded["z_s"]
    ref_terms, ref_grads = run("reference", rounded, head, weights)
    terms, grads = run(backend, case, head, weights, dtype, device or _device(backend))
    tol = TOL[dtype] if tol is None else tol
    worst = {"terms": 0.0, "grads": 0.0}
    assert terms.keys() == ref_terms.keys()
    for name, ref in ref_terms.items():
        assert abs(terms[name].item() - ref.item()) <= tol * max(1.0, abs(ref.item())), (name, terms[name], ref)
        worst["terms"] = max(worst["terms"], abs(terms[name].item() - ref.item()) / max(1.0, abs(ref.item())))
    for name, ref in ref_grads.items():
        assert (grads[name] is None) == (ref is None), name
        if ref is not None:
            err = (grads[name] - ref).abs().max().item()
            assert err <= tol * max(ref.abs().max().item(), grad_floor), (name, err, ref.abs().max().item())
            worst["grads"] = max(worst["grads"], err / max(ref.abs().max().item(), grad_floor))
    return worst


def test_case_exercises_arcface_fallback():
    case, m = make_case(), HEADS["arcface"].m
    for z, W in (("z_s", "W_s"), ("z_st", "W_t")):
        w_y = case[W][case["labels"]]
        cos = torch.nn.functional.cosine_similarity(case[z], w_y, dim=1)
        assert (cos[:3] <= math.cos(math.pi - m)).all() and (cos[3:5] > math.cos(math.pi - m)).all()


@pytest.mark.parametrize("backend", BLOCKED)
@pytest.mark.parametrize("kind", list(HEADS))
def test_all_terms_match_reference(backend, kind):
    assert_matches_reference(backend, make_case(), HEADS[kind], ALL_TERMS)


@pytest.mark.parametrize("backend", BLOCKED)
@pytest.mark.parametrize("term", list(ONE_TERM))
def test_each_term_alone_matches_reference(backend, term):
    kind = "linear" if term in ("kd", "th_ce") else "arcface"  # ce/th_kd on the margin head, the others on bias
    assert_matches_reference(backend, make_case(C=300), HEADS[kind], ONE_TERM[term])


@pytest.mark.parametrize("backend", BLOCKED)
@pytest.mark.parametrize("shape", [dict(C=1), dict(B=1), dict(B=1, C=1)], ids=["C=1", "B=1", "B=1,C=1"])
def test_edge_shapes(backend, shape):
    # With C=1 every loss and gradient is exactly zero; what is left is rounding noise scaled by s=64.
    assert_matches_reference(backend, make_case(**shape), HEADS["arcface"], ALL_TERMS, grad_floor=1.0)


@pytest.mark.parametrize("backend", BLOCKED)
def test_shared_embedding_sums_both_paths(backend):
    """Without a projection z_st is z_s: the gradient of z_s is the sum over student-head and teacher-head terms."""
    assert_matches_reference(backend, make_case(shared_embedding=True), HEADS["cosface"], ALL_TERMS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_low_precision_inputs(dtype):
    assert_matches_reference("chunked", make_case(), HEADS["arcface"], ALL_TERMS, dtype)


def test_chunked_float64_is_exact():
    case, head = make_case(C=200), HEADS["arcface"]
    ref_terms, ref_grads = run("reference", case, head, ALL_TERMS)
    terms, grads = run("chunked", case, head, ALL_TERMS)
    # float64 (u = 1.1e-16), the same math summed in 128-class blocks instead of at once: the log-sum-exps over
    # C = 200 logits of size ≤ s = 64 differ by ≲ C·u·s ≈ 1.4e-12 at worst (typically √C times less), on terms of
    # size ~1-10; the gradients go through one more product: 1e-10 relative, 1e-12 absolute.
    for name in ref_terms:
        torch.testing.assert_close(terms[name], ref_terms[name], rtol=1e-12, atol=1e-12)
    for name in GRADS:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12)


def test_entry_point_dispatch_and_l2e():
    assert {"auto", "reference", "chunked"} <= set(list_loss_backends())
    assert resolve_backend("auto", torch.device("cpu")) == "chunked"
    case = {k: v if k == "labels" else v.float() for k, v in make_case(C=50).items()}
    w = LossWeights(ce=1.0, kd=0.5, th_ce=0.25, th_kd=0.1, l2e=0.3, T=3.0)
    out = {}
    W_s = case["W_t"] + 0.05 * case["W_s"][:, : case["W_t"].shape[1]]  # teacher width: both heads read z_s
    for backend in ("reference", "auto"):
        z_s = case["z_st"].clone().requires_grad_()
        total, terms = shared_head_loss(z_s, case["labels"], W_s=W_s, W_t=case["W_t"], z_t=case["z_t"],
                                        head=HEADS["arcface"], weights=w, backend=backend)  # fmt: skip
        total.backward()
        out[backend] = (total.detach(), terms, z_s.grad)
    # Both float32 (chunked against the reference's own float32 math): the error model of TOL[float32] (2e-5 of the
    # largest value) for the total, 1e-4 relative and 1e-6 absolute for the gradient entries.
    torch.testing.assert_close(out["auto"][0], out["reference"][0], rtol=1e-5, atol=1e-5)
    assert out["auto"][1].keys() == out["reference"][1].keys() == {"ce", "kd", "th_ce", "th_kd", "l2e"}
    torch.testing.assert_close(out["auto"][2], out["reference"][2], rtol=1e-4, atol=1e-6)


def compiled_step_matches_eager(backend: str, device: str = "cpu"):
    """A training step (backbone, loss, backward) under torch.compile(fullgraph=True) vs eager."""
    torch.manual_seed(0)
    backbone = torch.nn.Linear(12, 24).to(device)
    W_s = torch.nn.Parameter(torch.randn(50, 24, device=device) * 0.1)
    W_t = torch.randn(50, 24, device=device) * 0.1
    x, z_t = torch.randn(8, 12, device=device), torch.randn(8, 24, device=device)
    labels = torch.randint(0, 50, (8,), device=device)
    head, weights = HEADS["arcface"], LossWeights(ce=1.0, kd=0.5, th_ce=0.3, th_kd=0.2, l2e=0.1, T=4.0)
    params = [W_s, *backbone.parameters()]

    def step(x, z_t, labels):
        z_s = backbone(x)
        total, _ = shared_head_loss(z_s, labels, W_s=W_s, W_t=W_t, z_t=z_t, head=head, weights=weights,
                                    backend=backend)  # fmt: skip
        return total

    def grads(fn):
        for p in params:
            p.grad = None
        loss = fn(x, z_t, labels)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    explanation = torch._dynamo.explain(step)(x, z_t, labels)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    torch._dynamo.reset()
    eager_loss, eager_grads = grads(step)
    compiled_loss, compiled_grads = grads(torch.compile(step, fullgraph=True))
    # float32, the same math with Inductor's fused kernels (other summation orders, D = 24, s = 64, C = 50): the error
    # model of TOL[float32]: 1e-5 on the loss, 1e-4 relative (1e-5 absolute) on gradient entries.
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BLOCKED)
def test_compiled_training_step_has_no_graph_break(backend):
    _backend(backend)  # skips triton where it cannot run
    compiled_step_matches_eager(backend, str(_device(backend)))


_PEAK_SCRIPT = r"""
import json, re, sys, torch
from edgekd.heads import HeadSpec
from edgekd.losses import LossWeights, shared_head_loss

def rss(key):
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

def peak_of(fn):
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark VmHWM to the current RSS
    base = rss("VmRSS")
    fn()
    return rss("VmHWM") - base

B, C, D = 256, 200_000, 32
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
z_s = torch.randn(B, D, generator=g).requires_grad_()
W_s = (torch.randn(C, D, generator=g) * 0.1).requires_grad_()
W_t, z_t = torch.randn(C, D, generator=g) * 0.1, torch.randn(B, D, generator=g)
labels = torch.randint(0, C, (B,), generator=g)
head, w = HeadSpec("arcface"), LossWeights(ce=1.0, kd=1.0, th_ce=1.0, th_kd=1.0, T=4.0)

def step(n=C):
    total, _ = shared_head_loss(z_s, labels % n, W_s=W_s[:n], W_t=W_t[:n], z_t=z_t, head=head, weights=w,
                                backend="chunked")
    total.backward()

step(1000)  # warm-up: imports, op registration, allocator pools
z_s.grad = W_s.grad = None
probe = peak_of(lambda: torch.ones(B, C).sum())  # one B×C fp32 tensor, to show the method sees it
peak = peak_of(step)
print(json.dumps({"probe": probe, "peak": peak, "bc_bytes": B * C * 4, "dw_bytes": C * D * 4}))
"""


@pytest.mark.slow  # ~7 s of subprocess peak-RSS measurement
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS accounting")
def test_chunked_peak_memory_far_below_one_logit_matrix():
    """Measured peak resident memory of a chunked forward+backward at B=256, C=200k (D=32, all four terms).

    The child process fixes glibc's mmap threshold, so every tensor above 64 KiB is its own mapping and freeing it
    returns the pages: the RSS high-water mark then tracks live tensor bytes. A probe allocation of one B×C fp32
    tensor shows that the method sees such a tensor. The peak includes dW_s (C×D fp32) and the gradient buffers.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"chunked peak {r['peak'] / 2**20:.1f} MiB vs one B×C fp32 {r['bc_bytes'] / 2**20:.1f} MiB")
    assert r["probe"] >= 0.95 * r["bc_bytes"], r
    assert r["peak"] <= 0.4 * r["bc_bytes"], r


# ------------------------------------------------------------------------------------------------- on a CUDA GPU
# Marked ``gpu`` (run by ``make gpu-check``); skipped without CUDA. Every backend runs on the GPU and is compared
# with the float64 reference on the CPU, on the same rounded inputs.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# The reference keeps 16-bit logits and softmax in the input dtype (it is the definition, not a fused kernel), so its
# 16-bit bounds are looser than TOL, which the fp32-accumulating backends meet. A logit of size up to s = 64 held in
# bf16 is off by up to half an ulp, 64·2⁻⁹ ≈ 0.13 (fp16: 64·2⁻¹² ≈ 0.016), and terms built from log-softmax
# differences move by that order relative to their size: 1.5e-1 (bf16) and 2e-2 (fp16). Measured on the CPU with
# make_case(): bf16 terms 5.1e-2 (the kd term of the linear head), gradients 3.5e-2; fp16 2.8e-3 and 4.5e-3.
REFERENCE_TOL = {torch.float32: TOL[torch.float32], torch.float16: 2e-2, torch.bfloat16: 1.5e-1}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tol(backend: str, dtype: torch.dtype) -> float:
    return REFERENCE_TOL[dtype] if backend == "reference" else TOL[dtype]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["linear", "arcface"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_on_cuda_matches_float64(backend, kind, dtype, record_property):
    """Odd shapes (B=37, D_s=96, D_t=64, C=1013), every term; the ArcFace case includes fallback rows."""
    worst = assert_matches_reference(backend, make_case(), HEADS[kind], ALL_TERMS, dtype, device="cuda",
                                     tol=_tol(backend, dtype))  # fmt: skip
    record_property("max_rel_error", json.dumps(worst))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_on_cuda_matches_float64_at_gpu_tile_sizes(dtype, record_property):
    """A shape that crosses the GPU launcher's tiles and splits the classes across many programs."""
    case = make_case(B=300, D_s=200, D_t=136, C=5003, seed=1)
    worst = assert_matches_reference("triton", case, HEADS["arcface"], ALL_TERMS, dtype, device="cuda")
    record_property("max_rel_error", json.dumps(worst))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_arcface_fallback_rows_on_cuda(backend, dtype):
    """Only rows at the fallback boundary: 0–2 have θ + m > π (the fallback), 3–4 lie just inside it."""
    case = make_case(B=5, C=300, seed=2)
    weights = LossWeights(ce=1.0, th_ce=1.0)
    assert_matches_reference(backend, case, HEADS["arcface"], weights, dtype, device="cuda", tol=_tol(backend, dtype))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", BLOCKED)
def test_compiled_training_step_on_cuda_has_no_graph_break(backend):
    """torch.compile(fullgraph=True) of backbone + loss + backward on CUDA, against eager."""
    compiled_step_matches_eager(backend, "cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_and_th_kd_at_their_own_temperatures(backend):
    """kd at T = 2 and th_kd at T_th = 5 through the entry point, against the KL formulas written out in float64."""
    _backend(backend)  # skips triton where it cannot run
    device, head = _device(backend), HEADS["cosface"]
    case = make_case(B=9, C=300, seed=5, shared_embedding=True)  # D_s = D_t: both heads read z_s
    weights = LossWeights(ce=1.0, kd=0.7, th_ce=0.3, th_kd=0.4, T=2.0, T_th=5.0)
    dtype = torch.float64 if backend != "triton" else torch.float32
    z_s = case["z_s"].to(device, dtype).requires_grad_()
    W_s = case["W_s"].to(device, dtype).requires_grad_()
    W_t, z_t, labels = case["W_t"].to(device, dtype), case["z_t"].to(device, dtype), case["labels"].to(device)
    total, terms = shared_head_loss(z_s, labels, W_s=W_s, W_t=W_t, z_t=z_t, head=head, weights=weights, backend=backend)
    grads = torch.autograd.grad(total, (z_s, W_s))

    z, ws = case["z_s"].clone().requires_grad_(), case["W_s"].clone().requires_grad_()
    cos = lambda a, w: torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(w, dim=1).T  # noqa: E731
    teacher = head.s * cos(case["z_t"], case["W_t"])

    def kl(student_logits, T):
        log_p_t, log_p = (torch.log_softmax(logits / T, dim=1) for logits in (teacher, student_logits))
        return T * T * (log_p_t.exp() * (log_p_t - log_p)).sum(1).mean()

    def ce(logits):
        margin = torch.zeros_like(logits).scatter_(1, case["labels"][:, None], head.s * head.m)
        return torch.nn.functional.cross_entropy(logits - margin, case["labels"])

    expected = {
        "ce": ce(head.s * cos(z, ws)),
        "kd": kl(head.s * cos(z, ws), 2.0),
        "th_ce": ce(head.s * cos(z, case["W_t"])),
        "th_kd": kl(head.s * cos(z, case["W_t"]), 5.0),
    }
    expected_total = sum(getattr(weights, name) * value for name, value in expected.items())
    expected_grads = torch.autograd.grad(expected_total, (z, ws))
    # float64: the same formulas in another order (C = 300, s = 64: ≲ 1e-12 relative); float32 (triton): TOL's model.
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    assert terms.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(terms[name].double().cpu(), value.detach(), rtol=rtol, atol=rtol)
    for got, want in zip(grads, expected_grads, strict=True):
        scale = want.abs().max()
        torch.testing.assert_close(got.double().cpu() / scale, want / scale, rtol=rtol, atol=rtol * 10)
