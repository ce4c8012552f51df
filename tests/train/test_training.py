"""The training loop: exact resume, frozen parts, NaN handling, compiled step vs eager."""

import json
from dataclasses import replace

import pytest
import torch

from edgekd.bundle import Bundle
from edgekd.data.synthetic import SyntheticIdentities
from edgekd.distill.pipeline import build_trainee, student_embed_dim
from edgekd.errors import EdgekdError, TrainingDiverged
from edgekd.heads import create_head
from edgekd.losses import LossWeights
from edgekd.train.checkpoint import latest_checkpoint, load_checkpoint
from edgekd.train.config import TrainConfig
from edgekd.train.loop import fit
from edgekd.train.optim import build_optimizer
from edgekd.train.teacher import Teacher
from edgekd.train.trainer import make_loss_fn

CFG = TrainConfig(
    model="mbf_tiny",
    head="arcface",
    batch_size=16,
    steps=6,
    lr=0.05,
    warmup_steps=2,
    compile=False,
    checkpoint_every=3,
    log_every=1,
    device="cpu",
    seed=3,
)
THKD = LossWeights(ce=1.0, kd=0.5, th_ce=1.0, th_kd=0.5, l2e=1.0, T=4.0)


def _teacher(dataset):
    teacher = build_trainee(replace(CFG, model="r_tiny", seed=11), dataset)
    return teacher, Teacher(teacher.backbone.eval(), teacher.head.freeze())


def _student(dataset, teacher):
    return build_trainee(CFG, dataset, embed_dim=student_embed_dim(CFG, teacher, THKD))


def _state(bundle: Bundle) -> dict:
    return {
        f"{p}.{k}": v.clone()
        for p, m in (("b", bundle.backbone), ("h", bundle.head))
        if m is not None
        for k, v in m.state_dict().items()
    }


def _metrics(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("images_per_s", "time")} for line in lines]


@pytest.mark.parametrize("sample_rate", [1.0, 0.25])
def test_interrupted_and_resumed_run_ends_bit_identical(tiny_faces, tmp_path, sample_rate):
    """Also with Partial FC sampling (48 identities, a batch of 16 sees at most 16: 12 of 48 rows drawn per step, the
    positives among them), whose draw is a function of the step."""
    cfg = replace(CFG, sample_rate=sample_rate)
    data = tiny_faces if sample_rate == 1 else SyntheticIdentities(48, 2, image_size=32, seed=0)
    teacher, frozen = _teacher(data)
    full = _student(data, teacher)
    fit(full, cfg, THKD, data, tmp_path / "full", teacher=frozen)

    part = _student(data, teacher)
    stopped = fit(part, replace(cfg, stop_after=4), THKD, data, tmp_path / "cut", teacher=frozen)
    # A --stop-after run saves where it stops (step 4), not only at the schedule's checkpoints (every 3).
    assert stopped.stopped and latest_checkpoint(tmp_path / "cut").name == "step_0000004"
    # A fresh process would rebuild the modules from scratch before resuming: do the same.
    resumed = _student(data, teacher)
    torch.manual_seed(1234)  # resume must not depend on the global RNG state at start
    result = fit(resumed, cfg, THKD, data, tmp_path / "cut", teacher=frozen, resume=True)
    assert not result.stopped and result.steps == 6
    if sample_rate < 1:  # the draw took effect: the first step's loss is not the full head's
        exact = fit(_student(data, teacher), replace(CFG, steps=1), THKD, data, tmp_path / "exact", teacher=frozen)
        assert exact.last["loss"] != _metrics(tmp_path / "full")[0]["loss"]

    # Bit for bit, as the product claims: both runs take steps 5-6 in this process with the same kernels on the same
    # shapes and thread count, from state restored exactly (checkpoints are copies), so every sum rounds alike.
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "cut")


def test_existing_run_needs_resume(tiny_faces, tmp_path):
    student = build_trainee(replace(CFG, steps=3), tiny_faces)
    fit(student, replace(CFG, steps=3), LossWeights(ce=1), tiny_faces, tmp_path)
    with pytest.raises(EdgekdError, match="--resume"):
        fit(build_trainee(CFG, tiny_faces), CFG, LossWeights(ce=1), tiny_faces, tmp_path)


def test_frozen_teacher_and_shared_head_stay_bit_identical(tiny_faces, tmp_path):
    teacher, frozen = _teacher(tiny_faces)
    before = _state(teacher)
    student = _student(tiny_faces, teacher)
    student_before = _state(student)
    fit(student, CFG, THKD, tiny_faces, tmp_path, teacher=frozen)
    after = _state(teacher)
    for key in before:  # exact: a frozen module is never written to
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(student_before[k], v) for k, v in _state(student).items())


def test_frozen_student_head_in_sh_kd_stage_i1(tiny_faces, tmp_path):
    trainee = build_trainee(replace(CFG, model="r_tiny", model_kwargs={"embed_dim": 32}), tiny_faces)
    theta_s = create_head("arcface", 32, tiny_faces.num_classes).freeze()
    trainee.head = theta_s
    frozen = theta_s.weight.clone()
    fit(trainee, CFG, LossWeights(ce=1), tiny_faces, tmp_path)
    assert torch.equal(theta_s.weight, frozen)  # exact: a frozen head is never written to


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_faces, tmp_path):
    cfg = replace(CFG, head="linear", lr=1e9, clip_grad=0.0, warmup_steps=0, checkpoint_every=1, steps=50)
    student = build_trainee(cfg, tiny_faces)
    with pytest.raises(TrainingDiverged, match="last good checkpoint is .*step_") as info:
        fit(student, cfg, LossWeights(ce=1), tiny_faces, tmp_path)
    assert "\n" not in str(info.value)
    kept = latest_checkpoint(tmp_path)
    restored = build_trainee(cfg, tiny_faces)
    load_checkpoint(
        kept,
        restored,
        build_optimizer([p for m in (restored.backbone, restored.head) for p in m.parameters()], 0.1, 0.9, 0.0),
    )
    assert all(torch.isfinite(p).all() for p in restored.backbone.parameters())


@pytest.mark.slow  # torch.compile: seconds on a quiet CPU, a minute on a busy one
def test_compiled_loss_has_no_graph_break_and_matches_eager(tiny_faces):
    teacher, frozen = _teacher(tiny_faces)
    bundle = _student(tiny_faces, teacher)
    # float64 so that the compiled kernels' different summation order cannot hide a real difference
    for module in (bundle.backbone, bundle.head, teacher.backbone, teacher.head):
        module.double()
    loss_fn = make_loss_fn(bundle, frozen, THKD, "reference")
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    labels = torch.arange(8) % tiny_faces.num_classes
    with torch.no_grad():
        z_t = teacher.backbone.eval()(x)
    params = [p for m in (bundle.backbone, bundle.head) for p in m.parameters()]
    eager, _ = loss_fn(x, labels, z_t)
    grads_eager = torch.autograd.grad(eager, params)
    torch._dynamo.reset()
    compiled_fn = torch.compile(loss_fn, fullgraph=True)  # fullgraph: any graph break raises
    compiled, _ = compiled_fn(x, labels, z_t)
    grads_compiled = torch.autograd.grad(compiled, params)
    # float64 (u = 1.1e-16): Inductor's fused kernels sum in other orders; over this net's reductions (≤ ~10³ terms,
    # a few layers) that is ≲ 1e-13 relative, and the gradients' cancellations leave it ≲ 1e-12 of their scale.
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-10)
    for g_e, g_c in zip(grads_eager, grads_compiled, strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-9, atol=1e-10)
