"""What a CUDA GPU breaks first in training, so that ``make gpu-check`` finds it before anything is timed: the
class-sharded step under NCCL with a torch.distributed.checkpoint save and resume, ``fit`` under its bf16 autocast
with the chunked and the Triton loss, and the compiled step with the Triton loss (one process, and a world of one).

The NCCL world is a world of one: NCCL refuses two ranks on one device, and one GPU is all a gpu-check machine is
sure to have; ``ShardedTrainee`` still runs every collective of its step, its clip and its checkpoint through it.

Each test's body is a function of the device. The CUDA variants are marked ``gpu`` (gpu-check's gpu_tests stage
runs them); the CPU variants (gloo, float32, Triton's interpreter) run in the suite and in ``make gpu-check DRY=1``.
The compiled CPU variants use ``aot_eager`` (Dynamo and AOTAutograd: Inductor's C++ build takes minutes on a small
CPU) and are marked slow.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from edgekd.bundle import Bundle, bundle_state_dict
from edgekd.data.transforms import normalize_and_flip
from edgekd.distill.pipeline import build_trainee, student_embed_dim
from edgekd.distributed.launch import World
from edgekd.losses import LossWeights
from edgekd.train.checkpoint import latest_checkpoint
from edgekd.train.config import TrainConfig
from edgekd.train.loop import fit
from edgekd.train.optim import build_optimizer
from edgekd.train.order import StepOrder
from edgekd.train.sharded import ShardedTrainee
from edgekd.train.teacher import Teacher
from edgekd.utils.device import move_module

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, needs_cuda])]
# The compiled variants: ~10 s of Dynamo tracing on a 2-core CPU.
SLOW_ON_CPU = [pytest.param("cpu", id="cpu", marks=pytest.mark.slow), DEVICES[1]]

CFG = TrainConfig(
    model="mbf_tiny", head="arcface", scale=16.0, margin=0.3, batch_size=16, steps=2, lr=0.05, warmup_steps=1,
    compile=False, checkpoint_every=2, log_every=1, seed=3, teacher_cache=False,
)  # fmt: skip
WEIGHTS = LossWeights(ce=1.0, kd=0.5, th_ce=1.0, th_kd=0.5, l2e=1.0, T=4.0)
TERMS = {"ce", "kd", "th_ce", "th_kd", "l2e"}
# The first step's loss of two runs from the same weights on the same batch, each with its own kernels: under the
# loop's bf16 autocast on CUDA (the embeddings are bf16: u = 2⁻⁸ ≈ 4e-3 relative, and s = 16 scales a cosine's
# rounding into the logits: 2e-2 ≈ 5u), in float32 on the CPU (u = 2⁻²⁴: a logit s·cos of D = 128 terms rounds by
# ≈ s·√D·u ≈ 1e-5, s·D·u ≈ 1.2e-4 at worst, on a loss of ~10-20 summed over five terms: 1e-4 relative is ~1e-3).
LOSS_RTOL = {"cuda": 2e-2, "cpu": 1e-4}


def _models(dataset, device: torch.device) -> tuple[Bundle, Teacher]:
    """A fresh mbf_tiny student with every head term over a frozen r_tiny teacher, on ``device``."""
    teacher = build_trainee(replace(CFG, model="r_tiny", seed=11), dataset)
    student = build_trainee(CFG, dataset, embed_dim=student_embed_dim(CFG, teacher, WEIGHTS))
    for module in (student.backbone, student.head):
        move_module(module, device).train()
    return student, Teacher(teacher.backbone.eval(), teacher.head.freeze()).to(device)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def _world_of_one(device: torch.device, init_file: Path):
    """A process group of this process alone (NCCL on CUDA, gloo on the CPU) as ``ShardedTrainee``'s world."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend, device_id = ("nccl", device) if device.type == "cuda" else ("gloo", None)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=0, world_size=1, device_id=device_id)
    try:
        yield World(group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _cuda(device: str) -> torch.device:
    """``cuda`` with its index (NCCL and DDP need it), or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)


# --------------------------------------------------------------------------- (a) the sharded step, saved and resumed


def _sharded_step(trainer: ShardedTrainee, step_fn, teacher: Teacher, optimizer, dataset, step: int, device) -> float:
    """One step as ``fit`` takes it on a rank (``step_fn`` from ``trainer.step_fn``): the batch, the teacher, the
    step under autocast, clip, SGD; the logged loss."""
    indices, flips = StepOrder(len(dataset), CFG.batch_size, CFG.seed, CFG.flip).batch(step)
    images = torch.stack([dataset[int(i)][0] for i in indices]).to(device)
    labels = torch.tensor([dataset[int(i)][1] for i in indices], device=device)
    x = normalize_and_flip(images, trainer.trainee.cfg.mean, trainer.trainee.cfg.std, flips)
    z_t = teacher.embed(images, indices, flips)
    with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
        total, terms = step_fn(x, labels, z_t, step)
    loss, _ = trainer.reduce(terms, total, WEIGHTS)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    trainer.clip(CFG.clip_grad)
    optimizer.step()
    return float(loss)  # a float or a device tensor, whichever reduce gives


def sharded_step_saves_and_resumes(device: torch.device, dataset, tmp_path: Path) -> None:
    """Two ``ShardedTrainee`` steps with a DCP checkpoint after the first; a fresh trainee loaded from it takes the
    second step to the same loss and weights (exactly on the CPU; on CUDA the Triton sweep's atomics add in any
    order)."""
    # CPU: bit for bit, both second steps run in this process with the same kernels on the same shapes from state the
    # checkpoint restores exactly. CUDA: the Triton sweep's atomics add in any order (float32, ≲ splits·u relative),
    # then bf16 autocast: 1e-4 relative, 1e-5 absolute.
    tol = {"rtol": 1e-4, "atol": 1e-5} if device.type == "cuda" else {"rtol": 0.0, "atol": 0.0}
    runs = []
    with _world_of_one(device, tmp_path / "init") as world:
        for resume in (False, True):
            student, teacher = _models(dataset, device)
            trainer = ShardedTrainee(student, teacher, world, device)
            optimizer = build_optimizer(trainer.parameters(), CFG.lr, CFG.momentum, CFG.weight_decay)
            step_fn = trainer.step_fn(WEIGHTS, "auto")  # triton on CUDA, chunked on the CPU
            if resume:
                info = trainer.load(latest_checkpoint(tmp_path / "run"), optimizer)
                assert info["step"] == 1 and info["format"] == "dcp" and info["world_size"] == 1, info
            else:
                assert _sharded_step(trainer, step_fn, teacher, optimizer, dataset, 0, device) > 0
                trainer.save(tmp_path / "run", 1, optimizer, {"config": CFG.to_dict()}, keep=2)
            loss = _sharded_step(trainer, step_fn, teacher, optimizer, dataset, 1, device)
            trainer.finish()
            trainer.close()
            runs.append((loss, bundle_state_dict(student)))
    (loss, weights), (resumed_loss, resumed) = runs
    assert resumed_loss == pytest.approx(loss, rel=tol["rtol"], abs=tol["atol"])
    assert weights.keys() == resumed.keys()
    for key in weights:
        torch.testing.assert_close(resumed[key], weights[key], **tol, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_sharded_step_saves_and_resumes_in_a_world_of_one(device, tiny_faces, tmp_path):
    sharded_step_saves_and_resumes(_cuda(device), tiny_faces, tmp_path)


# --------------------------------------------------------------------------- (b) fit with each blocked loss backend


def fit_trains_with_blocked_backends(device: torch.device, dataset, tmp_path: Path) -> None:
    """``fit`` (bf16 autocast on CUDA) with the chunked and the Triton loss: every step logs finite terms, the run
    checkpoints and moves the weights, and both backends' first loss agree (same weights, same batch)."""
    first = {}
    for backend in ("chunked", "triton"):
        student, teacher = _models(dataset, device)
        before = {k: v.clone() for k, v in bundle_state_dict(student).items()}  # on the CPU these are the parameters
        cfg = replace(CFG, device=str(device), loss_backend=backend)
        result = fit(student, cfg, WEIGHTS, dataset, tmp_path / backend, teacher=teacher)
        logged = _metrics(tmp_path / backend)
        assert result.steps == CFG.steps and [m["step"] for m in logged] == list(range(1, CFG.steps + 1)), backend
        numbers = [{k: v for k, v in m.items() if k != "time"} for m in logged]  # time: the line's UTC timestamp
        assert all(TERMS <= m.keys() and all(map(math.isfinite, m.values())) for m in numbers), logged
        assert latest_checkpoint(tmp_path / backend).name.endswith(str(CFG.steps)), backend
        after = bundle_state_dict(student)
        assert not torch.equal(after["head.weight"], before["head.weight"]), backend
        assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point()), backend
        first[backend] = logged[0]["loss"]
    assert first["triton"] == pytest.approx(first["chunked"], rel=LOSS_RTOL[device.type]), first


@pytest.mark.parametrize("device", DEVICES)
def test_fit_trains_with_chunked_and_triton_losses(device, tiny_faces, tmp_path):
    fit_trains_with_blocked_backends(_cuda(device), tiny_faces, tmp_path)


# ---------------------------------------------------------------------------------- (c) the compiled step, Triton


def _compile_backend(device: torch.device) -> str:
    """Inductor on CUDA, ``aot_eager`` on the CPU (see the module doc)."""
    return "inductor" if device.type == "cuda" else "aot_eager"


def compiled_fit_matches_eager(device: torch.device, dataset, tmp_path: Path, monkeypatch) -> None:
    """``fit`` with ``compile`` and the Triton loss (what ``edgekd distill`` runs on one GPU): no graph break, and
    its first loss is the eager run's."""
    first = {}
    for compile in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        if compile:  # fit calls torch.compile(loss_fn)
            monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=_compile_backend(device)))
        student, teacher = _models(dataset, device)
        cfg = replace(CFG, device=str(device), loss_backend="triton", compile=compile)
        fit(student, cfg, WEIGHTS, dataset, tmp_path / str(compile), teacher=teacher)
        assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
        logged = _metrics(tmp_path / str(compile))
        assert all(math.isfinite(m["loss"]) for m in logged) and len(logged) == CFG.steps, logged
        first[compile] = logged[0]["loss"]
    assert first[True] == pytest.approx(first[False], rel=LOSS_RTOL[device.type]), first


@pytest.mark.parametrize("device", SLOW_ON_CPU)
def test_compiled_fit_with_triton_matches_eager(device, tiny_faces, tmp_path, monkeypatch):
    compiled_fit_matches_eager(_cuda(device), tiny_faces, tmp_path, monkeypatch)


def compiled_sharded_step_matches_eager(device: torch.device, dataset, tmp_path: Path) -> None:
    """``ShardedTrainee``'s step compiled with the Triton sweep (what ``edgekd distill --nproc N`` runs on GPUs) in
    a world of one: no graph break, and the eager step's loss."""
    backend = _compile_backend(device)
    losses = {}
    with _world_of_one(device, tmp_path / "init") as world:
        for compile in (None, backend):
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            student, teacher = _models(dataset, device)
            trainer = ShardedTrainee(student, teacher, world, device, compile=compile)
            optimizer = build_optimizer(trainer.parameters(), CFG.lr, CFG.momentum, CFG.weight_decay)
            step_fn = trainer.step_fn(WEIGHTS, "triton")
            losses[compile] = _sharded_step(trainer, step_fn, teacher, optimizer, dataset, 0, device)
            trainer.close()
            assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert losses[backend] == pytest.approx(losses[None], rel=LOSS_RTOL[device.type]), losses


@pytest.mark.parametrize("device", SLOW_ON_CPU)
def test_compiled_sharded_step_with_triton_matches_eager(device, tiny_faces, tmp_path):
    compiled_sharded_step_matches_eager(_cuda(device), tiny_faces, tmp_path)
