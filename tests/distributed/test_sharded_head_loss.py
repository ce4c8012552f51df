"""The class-sharded shared-head loss on 2 gloo ranks (CPU, float64) against the reference on the global batch.

One spawn of 2 processes checks every case (start-up dominates the time): C = 11 classes split 6/5 in ``torch.chunk``
sizes, swept in blocks of 4 (two blocks per shard, the last partial), B = 4 rows per rank with labels on both shards,
row 0 in ArcFace's fallback region (θ + m > π). Per case, every rank compares the terms with
``shared_head_loss_reference`` on the 8 gathered rows, ``dW_s``/``db_s`` of its shard with the reference's rows, and
its row gradients with W = 2 times the reference's (the DDP convention of ``edgekd.distributed.sharded_loss``). One
case trains a DDP-wrapped linear backbone: its averaged gradient equals the single-process gradient of the global
loss, l2e (a per-rank mean) included; ``torch.library.opcheck`` checks the op on both ranks. Tolerance: rtol 1e-11,
atol 1e-12 (float64; the worst measured error is 6e-14). The same cases with the Triton sweep on each shard (float32
inputs, Triton's CPU interpreter) hold to rtol 1e-4, atol 1e-5 against the float64 reference; so does every sweep of
the registry, and a third one the workers register (tests/distributed/third_sweep.py), with no other edit.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import third_sweep  # tests/distributed/third_sweep.py: a sweep only these tests register
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from edgekd.distributed import class_shard_of, make_sharded_backend, sharded_shared_head_loss
from edgekd.distributed.sharded_loss import sharded_shared_head
from edgekd.distributed.shards import class_shard
from edgekd.errors import EdgekdError
from edgekd.heads import HEAD_KINDS, HeadSpec, default_margin
from edgekd.heads.class_sampling import ClassSampler
from edgekd.kernels.sweeps import SWEEPS
from edgekd.losses import shared_head_loss
from edgekd.losses.reference import shared_head_loss_reference
from edgekd.losses.terms import LossWeights, l2_embedding

WORLD, C, B, D_S, D_T, BLOCK_C = 2, 11, 4, 6, 5, 4
# Global labels: each rank's four rows hit both shards ([0, 6) and [6, 11)), on and next to the boundary.
LABELS = torch.tensor([0, 5, 6, 10, 3, 7, 5, 9])
HEADS = {kind: HeadSpec(kind, 1.0 if kind == "linear" else 64.0, default_margin(kind)) for kind in HEAD_KINDS}
ALL_TERMS = LossWeights(ce=1.0, kd=0.7, th_ce=0.3, th_kd=0.2)
# float64 (u = 1.1e-16): the shards' partial log-sum-exps merged, the same sums in another order over C = 11 logits of
# size ≤ s = 64: ≲ C·u·s ≈ 8e-14 (measured 6e-14), hence 1e-12 absolute and 1e-11 relative.
TOL = {"rtol": 1e-11, "atol": 1e-12}
# The Triton sweep (Triton's CPU interpreter here) takes float32 inputs and accumulates in float32 (u = 2⁻²⁴): logits
# s·cos with D ≤ 6 terms round by ≲ s·D·u ≈ 2e-5 at worst, √D times less typically; 1e-4 relative, 1e-5 absolute.
TOL_FP32 = {"rtol": 1e-4, "atol": 1e-5}
GRADS = ("z_s", "W_s", "b_s", "z_st")


def _place_cos(z: torch.Tensor, w: torch.Tensor, cos: float, g: torch.Generator) -> torch.Tensor:
    """A vector with norm ‖z‖ at cosine ``cos`` to w."""
    w_hat = w / w.norm()
    u = torch.randn(w.shape, generator=g, dtype=w.dtype)
    u = u - (u @ w_hat) * w_hat
    return z.norm() * (cos * w_hat + math.sqrt(1 - cos * cos) * u / u.norm())


def _global_case(shared: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """The global batch (8 rows) and full heads, float64, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    d_t = D_S if shared else D_T
    rand = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale  # noqa: E731
    case = {"z_s": rand(WORLD * B, D_S), "W_s": rand(C, D_S, scale=0.3), "b_s": rand(C), "W_t": rand(C, d_t, scale=0.3)}
    case |= {"b_t": rand(C), "z_t": rand(WORLD * B, d_t), "z_st": rand(WORLD * B, d_t), "labels": LABELS}
    case["z_s"][0] = _place_cos(case["z_s"][0], case["W_s"][LABELS[0]], -0.95, g)  # ArcFace fallback (cos < −0.878)
    case["z_st"][0] = _place_cos(case["z_st"][0], case["W_t"][LABELS[0]], -0.95, g)
    if shared:
        case["z_st"] = case["z_s"]
    return case


def _leaves(case: dict, head: HeadSpec, rows: slice, classes: slice, use: set[str], dtype=torch.float64,
            device="cpu") -> dict:  # fmt: skip
    """Leaf tensors of the given rows and classes in ``dtype`` on ``device``; None for what the case leaves out
    (biases of normalized heads)."""
    rows_of = {"z_s", "z_st", "z_t"}
    out = {}
    for k, v in case.items():
        if k == "labels" or (k not in use) or (k in ("b_s", "b_t") and head.kind != "linear"):
            continue
        if k == "z_st" and case["z_st"] is case["z_s"]:
            continue
        out[k] = v[rows if k in rows_of else classes].to(device, dtype).clone().requires_grad_(k in GRADS)
    out["z_st"] = out.get("z_st", out.get("z_s"))
    return out


def _terms_and_grads(fn, leaves: dict, labels: torch.Tensor, head: HeadSpec, weights: LossWeights, **kw):
    terms = fn(leaves["z_s"], labels, leaves.get("W_s"), leaves.get("b_s"), leaves["z_st"], leaves.get("W_t"),
               leaves.get("b_t"), leaves.get("z_t"), head, weights, **kw)  # fmt: skip
    sum(getattr(weights, name) * value for name, value in terms.items()).backward()  # grad_out = weights, not 1
    shared = leaves["z_st"] is leaves["z_s"]
    grads = {k: leaves[k].grad for k in GRADS if k in leaves and not (k == "z_st" and shared)}
    return {k: v.detach() for k, v in terms.items()}, grads


def _check_case(name, case, head, weights, use, group, errors, sweep="chunked", dtype=torch.float64, tol=TOL,
                device="cpu", block_c=BLOCK_C):  # fmt: skip
    """Terms and gradients of the sharded loss (``sweep`` on each shard, inputs in ``dtype`` on ``device``) on this
    rank against the float64 reference on the global batch (its ``len(LABELS)`` rows split over the ranks)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shard, per_rank = class_shard_of(C, group), len(LABELS) // world
    rows, classes = slice(rank * per_rank, (rank + 1) * per_rank), slice(shard.start, shard.stop)
    ref_terms, ref_grads = _terms_and_grads(
        shared_head_loss_reference, _leaves(case, head, slice(None), slice(None), use), LABELS, head, weights
    )
    terms, grads = _terms_and_grads(
        sharded_shared_head_loss, _leaves(case, head, rows, classes, use, dtype, device), LABELS[rows].to(device), head,
        weights, group=group, num_classes=C, block_c=block_c, sweep=sweep,
    )  # fmt: skip
    assert terms.keys() == ref_terms.keys(), (name, terms.keys())
    assert grads.keys() == ref_grads.keys(), (name, grads.keys())
    expected = {k: ref_terms[k] for k in terms}
    for k, ref in ref_grads.items():
        expected[f"d{k}"] = ref[classes] if k in ("W_s", "b_s") else world * ref[rows]  # rows: ×W, the DDP convention
    got = {k: v.double().cpu() for k, v in (terms | {f"d{k}": v for k, v in grads.items()}).items()}
    for k, ref in expected.items():
        torch.testing.assert_close(got[k], ref, **tol, msg=lambda m, k=k: f"{name} {k}: {m}")
        errors[f"{name} {k}"] = (got[k] - ref).abs().max().item()


def _check_ddp_backbone(group, errors):
    """A DDP-wrapped linear backbone under the sharded head terms plus l2e: its averaged gradient is the
    single-process gradient of the global-batch loss, and so is the head shard's."""
    rank, head, weights = dist.get_rank(group), HEADS["arcface"], LossWeights(ce=1.0, kd=0.5, th_kd=0.25, l2e=2.0)
    shard = class_shard_of(C, group)
    case = _global_case(shared=True, seed=1)
    x = torch.randn(WORLD * B, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.manual_seed(3)
    backbone = torch.nn.Linear(7, D_S, dtype=torch.float64)
    ref_backbone = torch.nn.Linear(7, D_S, dtype=torch.float64)
    ref_backbone.load_state_dict(backbone.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(backbone, process_group=group)

    W_s = case["W_s"].clone().requires_grad_()
    z = ref_backbone(x)
    ref = shared_head_loss_reference(z, LABELS, W_s, None, z, case["W_t"], None, case["z_t"], head, weights)
    ref["l2e"] = l2_embedding(z, case["z_t"])
    sum(getattr(weights, k) * v for k, v in ref.items()).backward()

    rows = slice(rank * B, (rank + 1) * B)
    W_local = shard.take(case["W_s"]).clone().requires_grad_()
    z = ddp(x[rows])
    terms = sharded_shared_head_loss(z, LABELS[rows], W_local, None, z, shard.take(case["W_t"]), None,
                                     case["z_t"][rows], head, weights, group=group, num_classes=C)  # fmt: skip
    terms["l2e"] = l2_embedding(z, case["z_t"][rows])  # a local mean: DDP's average makes it the global one
    sum(getattr(weights, k) * v for k, v in terms.items()).backward()
    pairs = {
        "weight": (backbone.weight.grad, ref_backbone.weight.grad),
        "bias": (backbone.bias.grad, ref_backbone.bias.grad),
        "W_s": (W_local.grad, shard.take(W_s.grad)),
    }
    for k, (got, want) in pairs.items():
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, k=k: f"ddp {k}: {m}")
        errors[f"ddp d{k}"] = (got - want).abs().max().item()


def _check_sampled(group, errors) -> None:
    """Partial FC sampling per shard: each rank draws from its own shard (rate 0.8: 5 of [0, 6), 4 of [6, 11), the
    positives 0, 3, 5 and 6, 7 among them); the terms and gradients equal the float64 reference on the union of both
    draws (built by hand: every rank recomputes both draws, a pure function of seed, step and shard), and the head
    shard's gradient is zero on the rows its rank did not draw."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    labels = torch.tensor([0, 5, 6, 0, 3, 7, 5, 6])
    head, weights, sampler = HEADS["arcface"], ALL_TERMS, ClassSampler(0.8, seed=4)
    shards = [class_shard(C, r, world) for r in range(world)]
    drawn = [sampler.rows(9, labels, sh.start, sh.size) for sh in shards]
    union = torch.cat([sh.start + rows for sh, rows in zip(shards, drawn, strict=True)])
    assert [len(rows) for rows in drawn] == [5, 4] and {0, 3, 5, 6, 7} <= set(union.tolist())
    case = _global_case(shared=True, seed=2)  # shared_head_loss: both heads read the student's embedding
    everything = {"z_s", "W_s", "W_t", "z_t"}
    ref = _leaves(case, head, slice(None), slice(None), everything)
    kept = union.tolist()
    position = torch.tensor([kept.index(c) for c in labels.tolist()])
    sub = dict(ref, W_s=ref["W_s"][union], W_t=ref["W_t"][union])
    ref_terms, ref_grads = _terms_and_grads(shared_head_loss_reference, sub, position, head, weights)
    ref_grads["W_s"] = ref["W_s"].grad  # of the full head: zero on rows not drawn

    shard, rows = shards[rank], slice(rank * B, (rank + 1) * B)
    leaves = _leaves(case, head, rows, slice(shard.start, shard.stop), everything)
    _, terms = shared_head_loss(
        leaves["z_s"], labels[rows], W_s=leaves["W_s"], W_t=leaves["W_t"], z_t=leaves["z_t"], head=head,
        weights=weights, backend=make_sharded_backend(group, C, block_c=BLOCK_C), rows=drawn[rank],
    )  # fmt: skip
    sum(getattr(weights, k) * v for k, v in terms.items()).backward()
    got = {k: v.detach() for k, v in terms.items()} | {"dz_s": leaves["z_s"].grad, "dW_s": leaves["W_s"].grad}
    expected = {k: ref_terms[k] for k in terms} | {"dz_s": world * ref_grads["z_s"][rows]}
    expected["dW_s"] = ref_grads["W_s"][shard.start : shard.stop]
    for k, want in expected.items():
        torch.testing.assert_close(got[k], want, **TOL, msg=lambda m, k=k: f"sampled {k}: {m}")
        errors[f"sampled {k}"] = (got[k] - want).abs().max().item()


def _opcheck(group) -> None:
    """torch.library.opcheck of the op (schema, fake kernels, autograd registration, AOT dispatch) on both ranks."""
    rank, shard, case = dist.get_rank(group), class_shard_of(C, group), _global_case(shared=False)
    rows, classes = slice(rank * B, (rank + 1) * B), slice(shard.start, shard.stop)
    names = ("z_s", "W_s", "b_s", "z_st", "W_t", "b_t")
    z_s, W_s, b_s, z_st, W_t, b_t = (case[k][rows if k.startswith("z") else classes].clone() for k in names)
    for t in (z_s, W_s, b_s, z_st):
        t.requires_grad_()
    torch.library.opcheck(
        sharded_shared_head,
        (z_s, LABELS[rows], W_s, b_s, z_st, W_t, b_t, case["z_t"][rows], None, 0, 1.0, 0.0, 2.0, 15, BLOCK_C,
         shard.start, group.group_name, "chunked"),
    )  # fmt: skip


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    SWEEPS[third_sweep.SWEEP.name] = third_sweep.SWEEP  # registered once: the sharded op must run it as it is
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        group, errors = dist.group.WORLD, {}
        everything = {"z_s", "W_s", "b_s", "W_t", "b_t", "z_t", "z_st"}
        for kind, head in HEADS.items():
            _check_case(f"{kind} all terms", _global_case(shared=False), head, ALL_TERMS, everything, group, errors)
            _check_case(f"{kind} shared z", _global_case(shared=True), head, ALL_TERMS, everything, group, errors)
            for sweep in (name for name in SWEEPS if name != "chunked"):  # chunked: the cases above
                fp32 = SWEEPS[sweep].requires == "triton"  # the Triton sweep takes float32 and accumulates in it
                _check_case(f"{kind} {sweep}", _global_case(shared=False), head, ALL_TERMS, everything, group, errors,
                            sweep=sweep, dtype=torch.float32 if fp32 else torch.float64,
                            tol=TOL_FP32 if fp32 else TOL)  # fmt: skip
        ce_only = {"z_s", "W_s", "b_s"}
        _check_case("linear ce only", _global_case(False), HEADS["linear"], LossWeights(), ce_only, group, errors)
        th_only = {"z_s", "W_t", "b_t", "z_t"}
        th_weights = LossWeights(ce=0.0, th_ce=0.5, th_kd=1.5)
        _check_case("cosface th only", _global_case(True), HEADS["cosface"], th_weights, th_only, group, errors)
        _check_ddp_backbone(group, errors)
        _check_sampled(group, errors)
        _opcheck(group)
        with pytest.raises(EdgekdError, match="pass the shard"):
            case = _global_case(False)
            sharded_shared_head_loss(case["z_s"][:B], LABELS[:B], case["W_s"], None, case["z_s"][:B], None, None,
                                     None, HEADS["cosine"], LossWeights(), group=group, num_classes=C)  # fmt: skip
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(errors, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~20 s on a loaded 2-core CPU, mostly start-up
def test_sharded_loss_matches_reference_on_two_gloo_ranks(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    errors = {}
    for rank in range(WORLD):
        errors |= {f"rank {rank} {k}": v for k, v in json.loads((tmp_path / f"rank{rank}.json").read_text()).items()}
    per_rank = [{k.split(" ", 2)[2] for k in errors if k.startswith(f"rank {rank} ")} for rank in range(WORLD)]
    # Every comparison ran on both ranks: 4 head kinds × (4 terms + dz_s, dW_s, dz_st; + db_s for linear), the same
    # with a shared embedding (no dz_st) and with every other sweep (the Triton one in float32, and the test's third,
    # registered in the workers only), ce alone (1 + dz_s, dW_s, db_s), th alone (2 + dz_s), DDP (3), sampled (4 + 2).
    others = len(SWEEPS) - 1 + 1
    assert per_rank[0] == per_rank[1] and len(per_rank[0]) == 29 + 25 + 29 * others + 4 + 3 + 3 + 6, per_rank
    for label, keep in (("float64 chunked", lambda k: "triton" not in k), ("float32 triton", lambda k: "triton" in k)):
        part = {k: v for k, v in errors.items() if keep(k)}
        worst = max(part, key=part.get)
        print(f"{label}: worst absolute error over {len(part)} comparisons: {part[worst]:.1e} ({worst})")


def _nccl_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world, device_id=device)
    try:
        group, errors = dist.group.WORLD, {}
        everything = {"z_s", "W_s", "b_s", "W_t", "b_t", "z_t", "z_st"}
        for kind, head in HEADS.items():
            for sweep in SWEEPS:
                case = _global_case(shared=kind == "arcface")
                # block_c 0: the GPU's own tiles (tl.dot needs 16 classes at least, this test's CPU blocks hold 4).
                kw = {"sweep": sweep, "dtype": torch.float32, "tol": TOL_FP32, "device": device, "block_c": 0}
                _check_case(f"{kind} {sweep}", case, head, ALL_TERMS, everything, group, errors, **kw)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(errors, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sharded_loss_on_nccl_ranks_matches_the_reference(tmp_path, record_property):
    """The op under NCCL on CUDA, chunked and Triton sweeps, float32, against the float64 reference on the CPU: 2
    ranks on 2 GPUs, or a world of one on one GPU (NCCL refuses two ranks on one device), which still runs every
    NCCL collective of the op."""
    world = min(2, torch.cuda.device_count())
    mp.start_processes(_nccl_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                       start_method="spawn")  # fmt: skip
    errors = {}
    for rank in range(world):
        errors |= {f"rank {rank} {k}": v for k, v in json.loads((tmp_path / f"rank{rank}.json").read_text()).items()}
    worst = max(errors, key=errors.get)
    record_property("nccl_world", world)
    record_property("worst_abs_error", f"{errors[worst]:.1e} ({worst})")
    # Per rank and sweep: 4 terms + dz_s, dW_s; + dz_st where z_st is its own tensor (all but arcface); + db_s on
    # the linear head: 6 + 7 + 7 + 8 = 28.
    assert len(errors) == world * len(SWEEPS) * 28, sorted(errors)
