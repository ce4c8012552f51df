"""The shared-head kernels: low-precision inputs, op registration (opcheck), import direction, launch rules, devices.

Parity with the float64 reference in fp32 over every head kind, term and edge shape is in
tests/losses/test_shared_head_backends.py (shared with the chunked backend). Without a GPU everything here runs
in Triton's CPU interpreter (tests/conftest.py), with tiny shapes and no bf16 arithmetic.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from edgekd.errors import EdgekdError
from edgekd.heads import HeadSpec
from edgekd.kernels._launch import interpreting, num_splits, sweep_config
from edgekd.kernels.chunked import shared_head_chunked
from edgekd.kernels.shared_head_autograd import make_loss_backend
from edgekd.kernels.shared_head_math import NEED_W_S, NEED_Z_S, NEED_Z_ST
from edgekd.kernels.shared_head_op import shared_head_triton
from edgekd.losses import LossWeights
from edgekd.losses.reference import shared_head_loss_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL_TERMS = LossWeights(ce=1.0, kd=0.7, th_ce=0.3, th_kd=0.2, T=4.0)
ALL_BITS = 15


def _case(B=37, D=96, D_t=64, C=1013, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype)  # noqa: E731
    return dict(
        z_s=rand(B, D), labels=torch.randint(0, C, (B,), generator=g), W_s=rand(C, D, scale=0.1), b_s=rand(C),
        z_st=rand(B, D_t), W_t=rand(C, D_t, scale=0.1), b_t=rand(C), z_t=rand(B, D_t),
    )  # fmt: skip


def _loss_and_grads(fn, case, head, weights, device):
    leaves = {k: v.to(device) for k, v in case.items()}
    for k in ("z_s", "W_s", "b_s", "z_st"):
        leaves[k] = leaves[k].detach().requires_grad_()
    b_s, b_t = (leaves["b_s"], leaves["b_t"]) if head.kind == "linear" else (None, None)
    terms = fn(leaves["z_s"], leaves["labels"], leaves["W_s"], b_s, leaves["z_st"], leaves["W_t"], b_t,
               leaves["z_t"], head, weights)  # fmt: skip
    sum(getattr(weights, k) * v for k, v in terms.items()).backward()
    grads = {k: leaves[k].grad for k in ("z_s", "W_s", "b_s", "z_st") if leaves[k].grad is not None}
    return {k: v.double().cpu() for k, v in terms.items()}, {k: v.double().cpu() for k, v in grads.items()}


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 on GPU")),
    ],
)
@pytest.mark.parametrize("kind", ["linear", "arcface"])
def test_low_precision_inputs_accumulate_in_fp32(dtype, kind):
    """16-bit inputs, fp32 accumulation: close to the float64 reference on the same rounded values."""
    head = HeadSpec(kind, 64.0 if kind != "linear" else 1.0, 0.5 if kind == "arcface" else 0.0)
    case = _case(dtype=dtype)
    ref = _loss_and_grads(shared_head_loss_reference, {k: v if k == "labels" else v.double() for k, v in
                                                       case.items()}, head, ALL_TERMS, "cpu")  # fmt: skip
    out = _loss_and_grads(make_loss_backend(shared_head_triton), case, head, ALL_TERMS, DEVICE)
    # 16-bit inputs are rounded alike for both sides; what differs is the kernel's own rounding to the input dtype
    # (normalized operands, returned gradients: ≤ u each, u = 2⁻¹¹ fp16, 2⁻⁸ bf16), the cosines' rounding scaled by
    # s = 64 into the logits, and fp32 accumulation: 1e-2 ≈ 20u (fp16) and 3e-2 ≈ 8u (bf16) of the largest value.
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    for name, value in ref[0].items():
        assert abs(out[0][name] - value) <= tol * max(1.0, abs(value)), name
    assert out[1].keys() == ref[1].keys()
    for name, value in ref[1].items():
        assert (out[1][name] - value).abs().max() <= tol * value.abs().max(), name


def test_gradient_dtypes_follow_inputs():
    case = _case(B=5, D=16, D_t=16, C=40, dtype=torch.float16)
    leaves = {k: v.to(DEVICE) for k, v in case.items()}
    for k in ("z_s", "W_s", "z_st"):
        leaves[k].requires_grad_()
    losses, stats = shared_head_triton(leaves["z_s"], leaves["labels"], leaves["W_s"], None, leaves["z_st"],
                                       leaves["W_t"], None, leaves["z_t"], 2, 64.0, 0.5, 4.0, ALL_BITS, 0)  # fmt: skip
    assert losses.dtype == stats.dtype == torch.float32 and stats.shape == (5, 5)
    losses.sum().backward()
    assert all(leaves[k].grad.dtype == torch.float16 for k in ("z_s", "W_s", "z_st"))


def _opcheck_args(device):
    case = _case(B=5, D=16, D_t=16, C=40)
    c = {k: v.to(device) for k, v in case.items()}
    for k in ("z_s", "W_s", "b_s", "z_st"):
        c[k].requires_grad_()
    return (c["z_s"], c["labels"], c["W_s"], c["b_s"], c["z_st"], c["W_t"], c["b_t"], c["z_t"], 0, 1.0, 0.0, 2.0,
            ALL_BITS, 16)  # fmt: skip


@pytest.mark.parametrize("op", [shared_head_triton, shared_head_chunked], ids=["triton", "chunked"])
def test_opcheck(op):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration, AOT dispatch."""
    device = DEVICE if op is shared_head_triton else "cpu"
    torch.library.opcheck(op, _opcheck_args(device))


def test_backward_op_fake_shapes_follow_need_bits():
    args = _opcheck_args("cpu")
    bwd = torch.ops.edgekd.shared_head_chunked_bwd
    grad, stats = torch.ones(4), torch.zeros(5, 5)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in (grad, stats, *args)]
        for need in (0, NEED_Z_S, NEED_Z_ST | NEED_W_S):
            dz_s, dz_st, dW_s, db_s = bwd(*fake, need)
            assert dz_s.shape == ((5, 16) if need & NEED_Z_S else (0,))
            assert dz_st.shape == ((5, 16) if need & NEED_Z_ST else (0,))
            assert dW_s.shape == ((40, 16) if need & NEED_W_S else (0,)) and db_s.shape[0] in (0, 40)


_IMPORT_SCRIPT = r"""
import pkgutil, sys
import edgekd.kernels
modules = sorted(m.name for m in pkgutil.iter_modules(edgekd.kernels.__path__, "edgekd.kernels."))
for name in modules:
    __import__(name)
print(",".join(modules))
print(",".join(sorted(m for m in sys.modules if m.startswith("edgekd.losses"))))
"""


def test_kernels_import_nothing_from_losses():
    """The dependency runs one way (edgekd.losses registers the kernels' ops): importing every module of
    edgekd.kernels in a fresh process loads no edgekd.losses module."""
    out = subprocess.run([sys.executable, "-c", _IMPORT_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    modules, losses = out.stdout.splitlines()[-2:]
    assert {"edgekd.kernels.chunked", "edgekd.kernels.shared_head", "edgekd.kernels.shared_head_op"} <= set(
        modules.split(",")
    )
    assert losses == "", losses


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    if torch.cuda.is_available() and not interpreting():
        pytest.skip("needs the CPU-without-interpreter situation")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(EdgekdError, match="chunked"):
        shared_head_triton(*_opcheck_args("cpu"))


@pytest.mark.parametrize("rows,blocks,target", [(1, 1, 528), (3, 32, 4), (16, 10, 528), (2, 1000, 528), (40, 7, 1)])
def test_num_splits_cover_every_class_block_once(rows, blocks, target):
    n_split, per = num_splits(rows, blocks, target)
    covered = [b for s in range(n_split) for b in range(s * per, min((s + 1) * per, blocks))]
    assert covered == list(range(blocks)) and all(s * per < blocks for s in range(n_split))


@pytest.mark.skipif(not interpreting(), reason="interpreter tile sizes")
def test_interpreter_uses_small_tiles():
    cfg = sweep_config("dz", 512, torch.float32, torch.device("cpu"))
    assert cfg.block_b * cfg.block_c <= 1024 and cfg.target_programs > 1  # several splits: atomics exercised


_AOT_SCRIPT = r"""
import os, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import edgekd.kernels.shared_head as sh
import edgekd.kernels.shared_head_kernels as shk
from edgekd.kernels._launch import next_pow2

FP32_PTRS = {"ns_ptr", "nt_ptr", "ts_ptr", "th_ptr", "part_ptr", "n_ptr", "ntt_ptr", "t_ptr", "dphi_ptr", "stats_ptr",
             "grad_ptr", "de_ptr"}
FLOATS = {"scale", "inv_T", "T", "inv_B"}
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

def compile_kernel(fn, dtype, consts, cfg):
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*i64" if p.name == "labels_ptr" else ("*fp32" if p.name in FP32_PTRS else "*" + dtype)
        else:
            sig[p.name] = "fp32" if p.name in FLOATS else "i32"
    consts = dict(consts, BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, BLOCK_K=cfg.block_k)
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    print(fn.__name__, dtype, consts.get("BLOCK_D"), k.metadata.shared, out.stderr.count("spill"), flush=True)

# sweep_config asks the device for its SM count; answer for an H100 SXM.
torch.cuda.get_device_properties = lambda device: type("Props", (), {"multi_processor_count": 132})()
for dtype, D in (("bf16", 512), ("fp16", 128), ("fp32", 128)):
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    cfg = lambda kind: sh.sweep_config(kind, D, torch_dtype, torch.device("cuda"))
    flags = dict(NORMALIZED=dtype != "fp16", UPCAST=False, PRECISION="tf32" if dtype == "fp32" else "ieee",
                 DO_CE=True, DO_KD=True)
    fwd = dict(flags, HAS_BIAS_S=dtype == "fp16", HAS_BIAS_T=dtype == "fp16", DO_TH_CE=True, DO_TH_KD=True)
    compile_kernel(shk.shared_head_fwd_kernel, dtype, fwd, cfg("fwd"))
    bwd = dict(flags, HAS_BIAS=dtype == "fp16", HAS_BIAS_T=dtype == "fp16", BLOCK_D=next_pow2(D))
    compile_kernel(shk.shared_head_dz_kernel, dtype, dict(bwd, COL_CE=0, COL_KD=1, G_CE=0, G_KD=1), cfg("dz"))
    compile_kernel(shk.shared_head_dw_kernel, dtype, bwd, cfg("dw"))
print("ok")
"""


@pytest.mark.slow  # compiles every kernel for sm_90 in a subprocess
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter accepts code the real compiler rejects (e.g. non-constexpr globals), so compile every
    kernel for an H100 (sm_90) with the launcher's GPU tile sizes: Triton's frontend, its NVIDIA passes and the
    bundled ptxas all run on the CPU."""
    import os

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("Triton's NVIDIA backend (bundled ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    out = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def _outputs(case: dict, head: HeadSpec, device: str) -> dict:
    """Losses and input gradients of one triton forward+backward (fresh leaves each call)."""
    leaves = {k: v.to(device) for k, v in case.items()}
    for k in ("z_s", "W_s", "z_st"):
        leaves[k].requires_grad_()
    losses, _ = shared_head_triton(leaves["z_s"], leaves["labels"], leaves["W_s"], None, leaves["z_st"],
                                   leaves["W_t"], None, leaves["z_t"], head.kind_id, head.s, head.m, ALL_TERMS.T,
                                   ALL_BITS, 0)  # fmt: skip
    losses.sum().backward()
    return {"losses": losses.detach(), **{f"d{k}": leaves[k].grad for k in ("z_s", "z_st", "W_s")}}


def _distinct(tensors: list[torch.Tensor]) -> int:
    """How many bitwise-different tensors the list holds."""
    kinds: list[torch.Tensor] = []
    for t in tensors:
        if not any(torch.equal(t, k) for k in kinds):
            kinds.append(t)
    return len(kinds)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_atomics_repeat_within_rounding_on_cuda(dtype, record_property):
    """The same inputs 20 times. Only the dz kernel adds with atomics (one add per class split into a (B, D) fp32
    buffer), so only dz may vary, and only by the order of fp32 additions; a race (a lost or doubled add) would
    move it by a whole split's share. The forward (per-split partials) and dW (one program per class block) have no
    atomics. The spread is recorded as ``max_r max|x_r − x_0| / max|x_0|`` per output."""
    case = _case(B=512, D=512, D_t=512, C=100_003, dtype=dtype, seed=3)
    head = HeadSpec("arcface", 64.0, 0.5)
    runs = [_outputs(case, head, "cuda") for _ in range(20)]
    spread = {
        name: max(((r[name].float() - runs[0][name].float()).abs().max() / runs[0][name].float().abs().max()).item()
                  for r in runs[1:])
        for name in runs[0]
    }  # fmt: skip
    distinct = {name: _distinct([r[name] for r in runs]) for name in runs[0]}
    record_property("spread", json.dumps({"dtype": str(dtype), "runs": len(runs), "spread": spread,
                                          "distinct_results": distinct}))  # fmt: skip
    # bf16 gradients are rounded to bf16 (8 significant bits) after fp32 accumulation: one last-bit flip is 2^-8.
    # fp32: n splits' atomic adds in another order differ by ≤ n·u·Σ|partials| (u = 2⁻²⁴); for n of order 100 that is
    # ≲ 1e-5 of the largest entry, while a lost or doubled add moves it by a whole split's share (~1/n).
    dz_bound = 1e-5 if dtype == torch.float32 else 2**-7
    assert spread["dz_s"] <= dz_bound and spread["dz_st"] <= dz_bound, spread
    # The forward and dW add in a fixed order (no atomics): they repeat bit for bit (spread 0); 1e-6 ≈ 17 float32 ulps
    # only keeps a report of the spread readable, it does not allow a race (a whole split's share, ~1/splits).
    assert spread["losses"] <= 1e-6 and spread["dW_s"] <= 1e-6, spread
