"""``fit`` on 2 gloo ranks (spawned, CPU) against ``fit`` in one process, in float64, and the parts it is made of.

One spawn runs every multi-rank check (start-up dominates the time):

- ``fit`` trains a MobileFaceNet-tiny student with every term (ce, kd at T = 4, th_ce, th_kd at T_th = 2, l2e) from a
  live r_tiny teacher, global batch 16 (8 rows per rank), 6 steps over two epochs, ArcFace over 8 classes (4 per
  rank), SGD with momentum and weight decay, the gradient clipped at 0.5 (it clips every step: the norm is 65-91), a
  checkpoint every 3 steps; in float64 its final weights and logged losses equal the one-process run's within 1e-10
  (measured 4e-15): synchronized BatchNorm, DDP's averaging, the sharded head's gradients, the clip norm, weight
  decay and the logged l2e are the one-process quantities, only summed in another order;
- the compiled step (``aot_eager``: Dynamo's graphs, no Inductor code generation) has no graph break and gives the
  eager step's loss and gradients; so does the step with the Triton sweep on each shard (``--loss-backend triton``,
  Triton's CPU interpreter, float32: within rtol 1e-4, atol 1e-5 of the chunked step);
- a fresh head left on the meta device materializes on each rank as the rows one process initializes (its student
  head is built that way under torchrun, and ``fit`` above starts from it);
- the teacher cache built by both ranks is the one-process cache (same key, same embeddings);
- on a RecordIO set (the same images, packed losslessly) each rank reads only its rows of every global batch, and
  the run ends with the weights of the run above;
- ``HeadShard.gather_into`` joins uneven shards (C = 11: 6/5) into rank 0's full head, in one piece or several;
- the cached default teacher's folder is rank 0's even where the ranks' data fingerprints differ (nodes).

The data order (each rank's rows of the same global batches) and the batch-divisibility error need no process group.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import edgekd.train.loop as loop
import edgekd.train.teacher as teacher_module
from edgekd.bundle import Bundle, bundle_state_dict
from edgekd.data.recordio import RecordIODataset, RecordWriter, pack_record
from edgekd.data.synthetic import SyntheticIdentities
from edgekd.distill.pipeline import _cached_run, build_trainee, student_embed_dim
from edgekd.distributed import head_shard
from edgekd.distributed.head_shard import HeadShard
from edgekd.distributed.launch import current_world
from edgekd.errors import EdgekdError
from edgekd.heads import create_head
from edgekd.heads.class_head import INIT_BLOCK_ROWS
from edgekd.losses import LossWeights, shared_head_loss
from edgekd.models import create_model
from edgekd.train.config import TrainConfig
from edgekd.train.loop import fit
from edgekd.train.order import StepOrder
from edgekd.train.sharded import ShardedTrainee
from edgekd.train.teacher import Teacher
from edgekd.train.teacher_cache import build_teacher_cache
from edgekd.train.trainer import LocalTrainee

WORLD = 2
CFG = TrainConfig(
    model="mbf_tiny", head="arcface", scale=16.0, margin=0.3, batch_size=16, steps=6, lr=0.1, warmup_steps=1,
    clip_grad=0.5, compile=False, checkpoint_every=3, keep_checkpoints=5, log_every=1, device="cpu", seed=3,
    teacher_cache=False,
)  # fmt: skip
WEIGHTS = LossWeights(ce=1.0, kd=0.5, th_ce=1.0, th_kd=0.5, l2e=1.0, T=4.0, T_th=2.0)
# float64 (u = 1.1e-16): the one-process quantities summed in another order, a few u each per step; 6 steps of training
# grow that to 4e-15 (measured), and 1e-10 leaves the growth of any of these short runs a wide margin.
TOL = {"rtol": 1e-10, "atol": 1e-10}
# The Triton sweep (float32, its own block sums) against the chunked step (float32): two float32 roundings of logits
# s·cos (s = 16, D = 6) and of the gradients, ≲ 1e-6 relative; 1e-4 relative and 1e-5 absolute.
TOL_FP32 = {"rtol": 1e-4, "atol": 1e-5}
AUTOCAST_KEYS = ("autocast chunked backbone grad / bound", "autocast triton backbone grad / bound")


def _data() -> SyntheticIdentities:
    return SyntheticIdentities(identities=8, images_per_identity=6, image_size=32, seed=0)  # 3 steps an epoch


def _float64(monkeypatch) -> None:
    """Images reach the models (student and live teacher) as float64: the comparison is free of float32 rounding."""
    for module in (loop, teacher_module):
        normalize = module.normalize_and_flip
        monkeypatch.setattr(module, "normalize_and_flip", lambda *a, f=normalize: f(*a).double())


def _models(dataset, world) -> tuple[Bundle, Teacher]:
    """Heads on the meta device in a world of several ranks (each computes its shard's rows), as edgekd builds them."""
    teacher = build_trainee(replace(CFG, model="r_tiny", seed=11), dataset, world=world)
    student = build_trainee(CFG, dataset, embed_dim=student_embed_dim(CFG, teacher, WEIGHTS), world=world)
    for module in (teacher.backbone, teacher.head, student.backbone, student.head):
        module.double()
    return student, Teacher(teacher.backbone.eval(), teacher.head.freeze())


# The face defaults (arcface_torch's lr 0.1, s 64, m 0.5, clip 5) for 20 steps, ce alone. There float32 runs of 2
# ranks and of 1 process part within a few steps (measured with the CLI, mbf_tiny, 32 identities: loss equal to 3e-5 at
# step 3, 5.1 apart at step 10): at lr 0.1 the dynamics amplify a rounding difference ~1e5-fold within 7 steps. In
# float64 the two runs stay the same model: 1.7e-10 measured after 20 steps, tested to 1e-6 (float64's 1e-16 times
# that amplification and more).
FACE = replace(CFG, scale=64.0, margin=0.5, lr=0.1, clip_grad=5.0, warmup_steps=0, steps=20, checkpoint_every=1000)
FACE_TOL = {"rtol": 1e-6, "atol": 1e-6}


def _fit_float64(run_dir: Path, dataset=None, cfg: TrainConfig = CFG, weights=WEIGHTS) -> dict[str, torch.Tensor]:
    """``fit`` in float64 on ``dataset`` (default ``_data()``); its models are built from ``_data()`` either way.

    The trained student's tensors: all of them on rank 0, the backbone's on the others (rank 0 alone gathers the
    trained head, which it writes; the others' stays a placeholder)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _float64(monkeypatch)
        student, teacher = _models(_data(), current_world())
        fit(student, cfg, weights, dataset if dataset is not None else _data(), run_dir, teacher=teacher,
            world=current_world())  # fmt: skip
    if current_world().is_main:
        return bundle_state_dict(student)
    assert student.head.weight.is_meta
    return bundle_state_dict(Bundle(student.backbone))


def _write_recordio(dataset, folder: Path) -> None:
    """``dataset`` as an insightface RecordIO set (header record, PNG bodies: lossless, so the images are equal)."""
    folder.mkdir()
    with RecordWriter(folder / "train.rec") as writer:
        n = len(dataset)
        writer.write(0, pack_record([n + 1, n + 1 + dataset.num_classes]))
        for index in range(n):
            image, label = dataset[index]
            png = io.BytesIO()
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(png, format="PNG")
            writer.write(index + 1, pack_record(float(label), png.getvalue()))


def _ranks_read_their_records(world, tmp: Path, two: dict[str, torch.Tensor], errors: dict) -> None:
    """``fit`` on a RecordIO set: each rank reads only its rows of every global batch (its records), and the run
    ends with the weights of the same run on the dataset the set was packed from."""
    folder = tmp / "rec"
    if world.is_main:
        _write_recordio(_data(), folder)
    world.barrier()
    read: list[int] = []
    getitem = RecordIODataset.__getitem__
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(RecordIODataset, "__getitem__", lambda self, i: (read.append(int(i)), getitem(self, i))[1])
        state = _fit_float64(tmp / "two_rec", RecordIODataset(folder))
    order = StepOrder(len(_data()), CFG.batch_size, CFG.seed, CFG.flip, world.rank, world.size)
    assert read == torch.cat([order.batch(step)[0] for step in range(CFG.steps)]).tolist()
    for key in two:
        torch.testing.assert_close(state[key], two[key], **TOL, msg=lambda m, key=key: f"RecordIO {key}: {m}")
    errors["recordio weights"] = max((state[k] - two[k]).abs().max().item() for k in two if two[k].is_floating_point())


class _TinyBackbone(nn.Sequential):
    """Conv-BN-ReLU, pooled, Linear-BN1d: BatchNorm of both kinds, cheap to compile."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(16, 6, bias=False), nn.BatchNorm1d(6),
        )  # fmt: skip


def _steps_agree(world, runs, tol: dict) -> float:
    """One ``ShardedTrainee`` step per ``(backend, compile, dtype)`` of ``runs``, from the same model and batch: the
    same loss and gradients as the first (within ``tol``) and no graph break; returns the largest gradient gap."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    results = []
    for backend, compile, dtype in runs:
        torch.manual_seed(0)
        student = Bundle(_TinyBackbone().to(dtype), create_head("arcface", 6, 11, s=16.0).to(dtype))
        teacher_head = create_head("arcface", 6, 11, s=16.0).to(dtype).freeze()
        trainer = ShardedTrainee(student, Teacher(nn.Identity(), teacher_head), world, torch.device("cpu"), compile)
        g = torch.Generator().manual_seed(1 + world.rank)
        x, z_t = torch.randn(4, 3, 8, 8, generator=g, dtype=dtype), torch.randn(4, 6, generator=g, dtype=dtype)
        labels = torch.tensor([0, 5, 6, 10]) if world.rank == 0 else torch.tensor([3, 7, 5, 9])
        total, _ = trainer.step_fn(WEIGHTS, backend)(x, labels, z_t, 0)
        total.backward()
        results.append((total.detach(), [p.grad for p in trainer.parameters()]))
        trainer.close()
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    (first, first_grads), *others = results
    for total, grads in others:
        torch.testing.assert_close(total, first, **tol)
        for a, b in zip(grads, first_grads, strict=True):
            torch.testing.assert_close(a, b, **tol)
    return max((a - b).abs().max().item() for _, grads in others for a, b in zip(grads, first_grads, strict=True))


def _compiled_step_matches_eager(world, errors: dict) -> None:
    """One step of ``ShardedTrainee`` eager and compiled (aot_eager), float64: same loss and gradients."""
    runs = [("auto", None, torch.float64), ("auto", "aot_eager", torch.float64)]
    errors["compiled grads"] = _steps_agree(world, runs, TOL)


def _triton_sweep_step_matches_chunked(world, errors: dict) -> None:
    """``--loss-backend triton`` under torchrun: one compiled (aot_eager) step with the Triton sweep on each shard
    (Triton's CPU interpreter, float32) gives the eager chunked step's loss and gradients."""
    runs = [("chunked", None, torch.float32), ("triton", "aot_eager", torch.float32)]
    errors["triton grads"] = _steps_agree(world, runs, TOL_FP32)


def _gathered(world, x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world.size)]
    dist.all_gather(parts, x.contiguous(), group=world.group)
    return torch.cat(parts)


def _autocast_steps_match_float64(world, errors: dict) -> None:
    """Under CPU bf16 autocast (what training on CUDA runs under), one ``ShardedTrainee`` step with each sweep, the
    Triton one compiled (aot_eager), against the float64 reference on the global batch of the step's own bf16
    embeddings: loss and head-shard gradient within float32 rounding, the backbone's gradient within the bf16 bound
    ``3u·(|dz|ᵀ|x|)`` derived in tests/losses/test_autocast.py (the reduce-scatter sums in float32, ×W is exact)."""
    u, fp32 = 2.0**-8, 2e-5
    g = torch.Generator().manual_seed(1 + world.rank)
    x, z_t = torch.randn(4, 12, generator=g), torch.randn(4, 6, generator=g)
    labels = torch.tensor([0, 5, 6, 10]) if world.rank == 0 else torch.tensor([3, 7, 5, 9])
    for backend, compile in (("chunked", None), ("triton", "aot_eager")):
        torch._dynamo.reset()
        torch.manual_seed(0)
        backbone = nn.Linear(12, 6, bias=False)
        student = Bundle(backbone, create_head("arcface", 6, 11, s=16.0))
        teacher_head = create_head("arcface", 6, 11, s=16.0)
        W_s, W_t = student.head.weight.detach().double(), teacher_head.weight.detach().double()
        trainer = ShardedTrainee(student, Teacher(nn.Identity(), teacher_head.freeze()), world, torch.device("cpu"),
                                 compile)  # fmt: skip
        with torch.autocast("cpu", torch.bfloat16):
            z = backbone(x).detach()  # the bf16 embedding the step's backbone computes
            total, terms = trainer.step_fn(WEIGHTS, backend)(x, labels, z_t, 0)
        total.backward()
        loss, _ = trainer.reduce(terms, total, WEIGHTS)  # the global batch's (l2e is a mean over this rank's rows)
        z64 = _gathered(world, z).double().requires_grad_()
        W64 = W_s.clone().requires_grad_()
        ref, _ = shared_head_loss(z64, _gathered(world, labels), W_s=W64, W_t=W_t, z_t=_gathered(world, z_t).double(),
                                  head=trainer.head.spec, weights=WEIGHTS, backend="reference")  # fmt: skip
        ref.backward()
        x_bf = _gathered(world, x).bfloat16().double()
        ref_dW_b, bound = z64.grad.T @ x_bf, z64.grad.abs().T @ x_bf.abs()
        ref_dW_s = trainer.head.shard.take(W64.grad)
        assert total.dtype == torch.float32 and z.dtype == torch.bfloat16
        assert abs(float(loss) - ref.item()) <= fp32 * max(1.0, abs(ref.item())), (backend, loss, ref)
        head_err = (trainer.head.weight.grad.double() - ref_dW_s).abs().max().item()
        assert head_err <= fp32 * W64.grad.abs().max().item(), (backend, head_err)
        err = (backbone.weight.grad.double() - ref_dW_b).abs()
        assert (err <= 3 * u * bound + fp32 * ref_dW_b.abs().max()).all(), (backend, (err / bound).max())
        errors[f"autocast {backend} backbone grad / bound"] = (err / (u * bound)).max().item()
        trainer.close()


# One small architecture of each kind of BatchNorm layer timm builds: plain BatchNorm2d (resnet), BatchNormAct2d
# (mobilenetv3, efficientnet: BatchNorm2d subclasses that also apply an activation), none (a ViT: LayerNorm).
TIMM_FAMILIES = ("timm/resnet10t", "timm/mobilenetv3_small_050", "timm/efficientnet_b0", "timm/test_vit")


def _student_of(arch: str) -> Bundle:
    torch.manual_seed(0)
    backbone = create_model(arch, input_size=32, embed_dim=8).double()
    return Bundle(backbone, create_head("arcface", 8, 11, s=16.0).double())


def _timm_families_train_as_one_process(world, errors: dict) -> None:
    """Each of ``TIMM_FAMILIES`` as a student under ``ShardedTrainee`` (synchronized BatchNorm, DDP, sharded head),
    float64: the embeddings of this rank's rows and one step's loss and gradients equal one process's on the global
    batch (within 1e-10: the same sums in another order; before timm's BatchNormAct2d kept its activation under
    torchrun, the embeddings differed by up to 3.2)."""
    g = torch.Generator().manual_seed(5)
    x_all = torch.randn(2 * 4, 3, 32, 32, generator=g, dtype=torch.float64)
    labels_all = torch.tensor([0, 5, 6, 10, 3, 7, 5, 9])
    rows = slice(4 * world.rank, 4 * world.rank + 4)
    weights = LossWeights(ce=1.0)
    for arch in TIMM_FAMILIES:
        one = _student_of(arch)
        z_one = one.backbone(x_all)
        local = LocalTrainee(_student_of(arch), None, compile=False)
        total_one, _ = local.step_fn(weights, "chunked")(x_all, labels_all, None, 0)
        total_one.backward()
        grads_one = {name: p.grad for name, p in local.trainee.backbone.named_parameters()}

        student = _student_of(arch)
        trainer = ShardedTrainee(student, None, world, torch.device("cpu"))
        assert not any(isinstance(m, _BatchNorm) for m in student.backbone.modules()), arch  # all synchronized
        torch.testing.assert_close(student.backbone(x_all[rows]), z_one[rows], **TOL, msg=lambda m, a=arch: f"{a}: {m}")
        total, _ = trainer.step_fn(weights, "chunked")(x_all[rows], labels_all[rows], None, 0)
        total.backward()
        torch.testing.assert_close(total, total_one, **TOL, msg=lambda m, a=arch: f"{a} loss: {m}")
        for name, p in student.backbone.named_parameters():
            torch.testing.assert_close(p.grad, grads_one[name], **TOL, msg=lambda m, a=arch, n=name: f"{a} {n}: {m}")
        errors[f"{arch} grads"] = max((p.grad - grads_one[n]).abs().max().item()
                                      for n, p in student.backbone.named_parameters())  # fmt: skip
        trainer.close()


def _unmaterialized_head_shards_are_rows_of_the_whole(world) -> None:
    """A head left on the meta device (``build_trainee`` under torchrun) gives each rank the rows one process
    initializes, with shards crossing ``INIT_BLOCK_ROWS`` boundaries; no rank allocates the whole head."""
    C = 2 * INIT_BLOCK_ROWS + 11  # shards of 4102 / 4101 rows: block 1 is cut between the ranks
    for kind in ("arcface", "linear"):
        torch.manual_seed(7)
        whole = create_head(kind, 5, C)
        torch.manual_seed(7)
        lazy = create_head(kind, 5, C, device="meta")
        assert lazy.weight.is_meta and lazy.init_seed == whole.init_seed
        shard = HeadShard(lazy, world.group)
        # exact: each rank draws the same whole blocks from the same generators (initial_rows) and slices its rows
        assert torch.equal(shard.weight, shard.shard.take(whole.weight)), kind
        if kind == "linear":
            assert torch.equal(shard.bias, torch.zeros(shard.shard.size))


def _cached_runs_take_rank_0s_folder(world, tmp: Path) -> None:
    """The default teacher's cache folder is rank 0's even where another node's copy of the data fingerprints
    otherwise (file times): every rank trains into one folder and agrees whether it is done."""

    class Copy:  # the same data, copied to another node with other file times
        fingerprint = f"data-on-node-{world.rank}"

    def train(run_dir: Path) -> Path:
        if world.is_main:
            run_dir.mkdir(parents=True)
            (run_dir / "teacher.safetensors").write_bytes(b"weights")
        world.barrier()
        return run_dir / "teacher.safetensors"

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("EDGEKD_CACHE_DIR", str(tmp / "cached_runs"))
        first = _cached_run("teachers", "teacher.safetensors", CFG, Copy(), train, world)
        again = _cached_run("teachers", "teacher.safetensors", CFG, Copy(), train, world)
    paths = [None] * world.size
    dist.all_gather_object(paths, (str(first[0]), first[1], str(again[0]), again[1]), group=world.group)
    assert paths[0] == paths[1] and paths[0][1] is True and paths[0][3] is False, paths


def _uneven_head_gathers(world) -> None:
    torch.manual_seed(5)
    full = create_head("linear", 3, 11)
    shard = HeadShard(full, world.group)
    assert shard.weight.shape[0] == (6, 5)[world.rank]
    target = create_head("linear", 3, 11)
    before = target.weight.clone()
    shard.gather_into(target)
    if world.is_main:  # exact: gathering copies the rows
        assert torch.equal(target.weight, full.weight) and torch.equal(target.bias, full.bias)
    else:
        assert torch.equal(target.weight, before)  # rank 0 alone gathers the head
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(head_shard, "GATHER_ROWS", 4)  # 6 rows per shard: two pieces, the second short
    target = create_head("linear", 3, 11)
    shard.gather_into(target)
    monkeypatch.undo()
    if world.is_main:
        assert torch.equal(target.weight, full.weight) and torch.equal(target.bias, full.bias)


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=WORLD)
    try:
        world, errors = current_world(), {}
        state = _fit_float64(Path(tmp) / "two")
        face = _fit_float64(Path(tmp) / "two_face", cfg=FACE, weights=LossWeights(ce=1.0))
        if rank == 0:
            torch.save(state, Path(tmp) / "two.pt")
            torch.save(face, Path(tmp) / "two_face.pt")
        _compiled_step_matches_eager(world, errors)
        _ranks_read_their_records(world, Path(tmp), state, errors)
        _triton_sweep_step_matches_chunked(world, errors)
        _autocast_steps_match_float64(world, errors)
        _timm_families_train_as_one_process(world, errors)
        _unmaterialized_head_shards_are_rows_of_the_whole(world)
        _uneven_head_gathers(world)
        _cached_runs_take_rank_0s_folder(world, Path(tmp))
        dataset = _data()
        r_tiny = build_trainee(replace(CFG, model="r_tiny", seed=11), dataset).backbone.eval()
        build_teacher_cache(r_tiny, dataset, r_tiny.cfg.mean, r_tiny.cfg.std, Path(tmp) / "cache", "cpu", 10, world)
        (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(errors))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # a 2-process spawn: ~40 s on a loaded 2-core CPU, mostly start-up and the aot_eager compile
def test_two_gloo_ranks_train_as_one_process(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
    for rank in range(WORLD):
        errors = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert errors.keys() == {
            "compiled grads",
            "recordio weights",
            "triton grads",
            *AUTOCAST_KEYS,
            *(f"{arch} grads" for arch in TIMM_FAMILIES),
        }, errors
        print(f"rank {rank}: worst absolute differences " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))

    two = torch.load(tmp_path / "two.pt")
    one = _fit_float64(tmp_path / "one")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")
    worst = max((two[k] - one[k]).abs().max().item() for k in one if one[k].is_floating_point())
    print(f"fit, 2 ranks vs 1 process (float64): worst absolute weight difference {worst:.1e}")
    read = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(read("one"), read("two"), strict=True):
        for key in a.keys() - {"images_per_s", "time"}:  # float64 losses: TOL's argument, 1e-12 for terms near 0
            assert b[key] == pytest.approx(a[key], rel=1e-10, abs=1e-12), (a["step"], key)

    face_two = torch.load(tmp_path / "two_face.pt")
    face_one = _fit_float64(tmp_path / "one_face", cfg=FACE, weights=LossWeights(ce=1.0))
    for key in face_one:
        torch.testing.assert_close(face_two[key], face_one[key], **FACE_TOL, msg=lambda m, key=key: f"face {key}: {m}")
    worst = max((face_two[k] - face_one[k]).abs().max().item() for k in face_one if face_one[k].is_floating_point())
    print(f"fit at the face defaults, 20 steps, 2 ranks vs 1 process (float64): worst weight difference {worst:.1e}")

    dataset = _data()
    r_tiny = build_trainee(replace(CFG, model="r_tiny", seed=11), dataset).backbone.eval()
    alone = build_teacher_cache(r_tiny, dataset, r_tiny.cfg.mean, r_tiny.cfg.std, tmp_path / "alone", "cpu", 10)
    (together,) = (tmp_path / "cache").glob("teacher_*.npy")
    assert together.name == alone.path.name
    # The same float32 network on other batch splits (10 images at a time alone, each rank's rows together): the
    # kernels may sum in another order, and each of r_tiny's layers adds a few float32 ulps of its output's scale.
    # 64 ulps (2⁻²³·64) of the largest embedding entry bounds that; 2e-6 was measured on an AMD EPYC (0 on a Xeon).
    together, alone = np.load(together), np.load(alone.path)
    np.testing.assert_allclose(together, alone, rtol=0, atol=64 * 2.0**-23 * np.abs(alone).max())


def test_ranks_read_their_rows_of_the_same_global_batches():
    whole = StepOrder(50, 12, seed=4, flip=True)
    parts = [StepOrder(50, 12, seed=4, flip=True, rank=r, world_size=3) for r in range(3)]
    for step in range(9):  # across epoch boundaries (4 steps an epoch)
        indices, flips = whole.batch(step)
        assert torch.equal(torch.cat([p.batch(step)[0] for p in parts]), indices)
        assert torch.equal(torch.cat([p.batch(step)[1] for p in parts]), flips)
        assert all(len(p.batch(step)[0]) == 4 for p in parts)


def test_a_global_batch_that_does_not_split_evenly_is_a_one_line_error():
    with pytest.raises(EdgekdError, match="--batch-size 10 is the global batch.*over 4 ranks; use a multiple of 4"):
        StepOrder(50, 10, seed=0, flip=False, rank=0, world_size=4)


def test_nproc_with_a_batch_that_does_not_split_is_refused_before_any_rank_starts(run_cli, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(["teacher", "--nproc", "3", "--batch-size", "8", "--device", "cpu", "--out", str(out)])
    assert code == 2 and err.strip().startswith("edgekd: error: --batch-size 8 is the global batch"), err
    assert "\n" not in err.strip() and not out.exists()


def test_nproc_with_a_loss_backend_that_cannot_run_on_a_shard_is_refused_before_any_rank_starts(run_cli, tmp_path):
    out = tmp_path / "run"
    argv = ["distill", "--nproc", "2", "--loss-backend", "reference", "--device", "cpu", "--out", str(out)]
    code, _, err = run_cli(argv)
    assert code == 2 and err.strip().startswith("edgekd: error: --loss-backend reference: under torchrun"), err
    assert "use --loss-backend auto, chunked or triton" in err and "\n" not in err.strip() and not out.exists()
