"""Classifier sharing the paper's way: the frozen teacher head reads the student's own embedding (issue 14, item 1),
and SH-KD's final stage in its two forms (item 2)."""

from dataclasses import replace

import pytest
import torch

from edgekd.bundle import load_bundle, save_bundle
from edgekd.distill.pipeline import build_trainee, run_sh_kd, student_embed_dim
from edgekd.errors import EdgekdError
from edgekd.heads.margin import margin_logits
from edgekd.losses import LossWeights
from edgekd.train.config import TrainConfig
from edgekd.train.teacher import Teacher
from edgekd.train.trainer import make_loss_fn

CFG = TrainConfig(model="mbf_tiny", batch_size=16, steps=2, compile=False, device="cpu", log_every=1, seed=3)
TH_ONLY = LossWeights(ce=0.0, th_ce=1.0, th_kd=1.0, T=4.0, T_th=4.0)


def _teacher(dataset, embed_dim=64):
    teacher = build_trainee(replace(CFG, model="r_tiny", model_kwargs={"embed_dim": embed_dim}, seed=11), dataset)
    return teacher, Teacher(teacher.backbone.eval(), teacher.head.freeze())


def _grads(loss_fn, student, x, labels, z_t) -> dict[str, torch.Tensor]:
    named = {f"backbone.{k}": p for k, p in student.backbone.named_parameters()}
    named.update({f"head.{k}": p for k, p in student.head.named_parameters()})
    total, _ = loss_fn(x, labels, z_t)
    grads = torch.autograd.grad(total, list(named.values()), allow_unused=True)
    return {k: g for k, g in zip(named, grads, strict=True) if g is not None and g.abs().max() > 0}


def test_teacher_head_terms_train_only_what_the_student_head_reads(tiny_faces):
    # C = 8 ≤ D_t = 64. Had the teacher head read a layer of its own (W_t·P·z_s with P trainable), W_t·P could be any
    # C×D_s map: the th terms could be driven down by P alone and would constrain nothing the student's head reads.
    teacher, frozen = _teacher(tiny_faces)
    assert tiny_faces.num_classes <= teacher.backbone.embed_dim
    student = build_trainee(CFG, tiny_faces, embed_dim=student_embed_dim(CFG, teacher, TH_ONLY))
    assert student.backbone.embed_dim == teacher.backbone.embed_dim == student.head.embed_dim
    for module in (student.backbone, student.head, teacher.backbone, teacher.head):
        module.double()
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    labels = torch.arange(8) % tiny_faces.num_classes
    with torch.no_grad():
        z_t = teacher.backbone(x)

    # The th_ce term is CE of the frozen teacher head on the student's embedding, the very one its own head reads.
    student.backbone.train()
    _, terms = make_loss_fn(student, frozen, TH_ONLY, "reference")(x, labels, z_t)
    z_s = student.backbone(x)
    expected = torch.nn.functional.cross_entropy(
        margin_logits(z_s, teacher.head.weight, None, labels, student.head.spec), labels
    )
    # float64 (u = 1.1e-16): the same embedding (train-mode BatchNorm uses the batch's statistics both times) and the
    # reference's CE against torch's, two orders of an 8-class log-sum-exp of logits ≤ s: ≲ 1e-14
    torch.testing.assert_close(terms["th_ce"], expected, rtol=1e-12, atol=1e-12)

    th = _grads(make_loss_fn(student, frozen, TH_ONLY, "reference"), student, x, labels, z_t)
    ce = _grads(make_loss_fn(student, frozen, LossWeights(ce=1.0), "reference"), student, x, labels, z_t)
    assert th, "the teacher-head terms train nothing"
    assert set(th) <= {k for k in ce if k.startswith("backbone.")}, set(th) - set(ce)


def test_a_student_width_other_than_the_teachers_is_refused_for_teacher_head_terms(tiny_faces):
    teacher, _ = _teacher(tiny_faces)
    cfg = replace(CFG, model_kwargs={"embed_dim": 32})
    with pytest.raises(EdgekdError, match="embed_dim 32 differs from the teacher's 64"):
        student_embed_dim(cfg, teacher, TH_ONLY)
    assert student_embed_dim(cfg, teacher, LossWeights(ce=1.0, kd=1.0)) is None  # kd reads logits only: any width


@pytest.mark.slow  # three short trainings
def test_sh_kd_final_stage_forms_share_one_student_aware_teacher(tiny_faces, tmp_path):
    cfg = replace(CFG, model_kwargs={"embed_dim": 64}, lr=1e-12, steps=1)  # lr ~0: I2's head stays where it began
    teacher_cfg = replace(cfg, model="r_tiny", lr=0.05, steps=2)
    i0 = build_trainee(cfg, tiny_faces)
    torch.nn.init.normal_(i0.head.weight)  # a θ_s no fresh head could start from
    temporary = save_bundle(tmp_path / "i0.safetensors", i0)
    weights = LossWeights(ce=1.0, kd=1.0, th_kd=1.0)
    th_form = run_sh_kd(cfg, teacher_cfg, weights, tiny_faces, tmp_path / "run", temporary_student=temporary)
    i1 = tmp_path / "run" / "sh_kd" / "i1" / "teacher.safetensors"
    i1_bytes = i1.read_bytes()
    official = run_sh_kd(
        cfg, teacher_cfg, LossWeights(ce=1.0, kd=1.0, l2e=1.0), tiny_faces, tmp_path / "run",
        fresh_head=True, temporary_student=temporary,
    )  # fmt: skip
    assert not (tmp_path / "run" / "sh_kd" / "i0").exists()  # the given I0 was reused, not retrained
    assert i1.read_bytes() == i1_bytes  # one I1 teacher for both forms
    theta_s = i0.head.weight.detach()
    assert torch.equal(load_bundle(i1).head.weight, theta_s)  # I1 trained on θ_s, frozen: a copy, exact
    # TH form: the head starts from θ_s and one step at lr 1e-12 moves an entry by ~1e-12·|g|, below its float32 ulp
    # (θ_s ~ N(0, 1)) or the default atol 1e-5
    torch.testing.assert_close(load_bundle(th_form).head.weight, theta_s)
    assert official.parent.name == "i2_fresh"
    fresh = load_bundle(official).head.weight
    assert (fresh - theta_s).abs().max() > 0.5  # official form: a freshly initialized head
