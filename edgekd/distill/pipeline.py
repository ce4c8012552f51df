"""Run a method end to end: build the trainee, get a teacher (given, cached, or trained here), train, save.

Run folders: ``<out>/teacher`` (when a teacher is trained here), ``<out>/student`` and, for SH-KD,
``<out>/sh_kd/{i0,i1,i2}``; each holds its checkpoints, ``metrics.jsonl`` and the final ``.safetensors``.
A stage whose final file exists is skipped, so an interrupted pipeline restarts where it stopped.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import torch

from edgekd.bundle import Bundle, assign_state, head_spec_of, load_bundle, read_bundle_meta, save_bundle
from edgekd.data import create_dataset, create_pairs
from edgekd.distributed.launch import ONE_PROCESS, World
from edgekd.errors import EdgekdError, EdgekdWarning
from edgekd.heads import ClassHead, HeadSpec, create_head
from edgekd.losses import LossWeights
from edgekd.models import create_model
from edgekd.train.config import TrainConfig
from edgekd.train.loop import fit
from edgekd.train.teacher import Teacher
from edgekd.train.verification import VerifyDuringTraining
from edgekd.utils.cache import cache_root
from edgekd.utils.device import resolve_device
from edgekd.utils.hashing import json_digest


def training_dataset(cfg: TrainConfig):
    """The dataset ``cfg.data`` names, at ``cfg.image_size`` when one is set; it must hold two classes (with one,
    every loss is 0 from the first step and the run would "succeed" having learned nothing) and one batch."""
    dataset = create_dataset(cfg.data, split="train", image_size=cfg.image_size, skip_bad=cfg.skip_bad or None)
    if getattr(dataset, "skipped", 0):
        warnings.warn(
            f"--skip-bad left out {dataset.skipped} unreadable image(s) of {cfg.data}", EdgekdWarning, stacklevel=2
        )
    if dataset.num_classes < 2:
        raise EdgekdError(
            f"{cfg.data} has {dataset.num_classes} class(es); a classifier learns nothing from one (its loss is 0 at "
            "once): give the training data two identities or classes at least"
        )
    if len(dataset) < cfg.batch_size:
        raise EdgekdError(
            f"{cfg.data} has {len(dataset)} training images, fewer than one batch of {cfg.batch_size}; "
            f"use --batch-size {len(dataset)} or less (with --nproc N, a multiple of N)"
        )
    return dataset


def build_trainee(cfg: TrainConfig, dataset, embed_dim: int | None = None, world: World = ONE_PROCESS) -> Bundle:
    """A fresh backbone + head for ``dataset``, seeded by ``cfg.seed``.

    In a world of several ranks the head stays on the meta device (``World.head_device``): ``fit`` gives each rank
    its class shard's rows of it (the values one process would have), and the whole head exists only once training
    has finished.
    """
    torch.manual_seed(cfg.seed)
    kwargs = {
        "input_size": cfg.image_size or dataset.image_size,
        "in_chans": dataset.channels,
        **({"embed_dim": embed_dim} if embed_dim else {}),
        **cfg.model_kwargs,
    }
    backbone = create_model(cfg.model, **kwargs)
    head = create_head(
        cfg.head, backbone.embed_dim, dataset.num_classes, s=cfg.scale, m=cfg.margin, device=world.head_device
    )
    return Bundle(backbone=backbone, head=head)


def _finish(trainee: Bundle, result, run_dir: Path, final: Path, meta: dict, world: World) -> Path | None:
    """Save the final bundle unless the run stopped early (``stop_after``); under torchrun rank 0 writes it (its
    trainee alone holds the whole trained head by then) and the others wait until it is in place."""
    if result.stopped:
        return None
    trainee.meta.update(meta)
    if world.is_main:
        save_bundle(final, trainee)
    world.barrier()
    return final


def train_teacher(
    cfg: TrainConfig,
    dataset,
    run_dir: Path,
    student_head: ClassHead | None = None,
    resume: bool = False,
    init: Bundle | None = None,
    world: World = ONE_PROCESS,
    verifier: VerifyDuringTraining | None = None,
) -> Path | None:
    """Train a teacher with CE on its own head, or (SH-KD I1) on ``student_head`` frozen; returns its file."""
    final = run_dir / "teacher.safetensors"
    if final.is_file():
        return final
    embed_dim = student_head.embed_dim if student_head is not None else None
    trainee = init if init is not None else build_trainee(cfg, dataset, embed_dim=embed_dim, world=world)
    if trainee.head is None:
        # A plain arcface_torch backbone (model.pt) comes without its Partial FC head: train a new one on this data.
        trainee.head = create_head(cfg.head, trainee.backbone.embed_dim, dataset.num_classes, s=cfg.scale, m=cfg.margin)
    if student_head is not None:
        check_teacher_classes(student_head.num_classes, dataset.num_classes, whose="the student head")
        if trainee.backbone.embed_dim != student_head.embed_dim:
            raise EdgekdError(
                f"the teacher embeds to {trainee.backbone.embed_dim} dims but the student head reads "
                f"{student_head.embed_dim}; build the teacher with the student's embed_dim"
            )
        trainee.head = _head_copy(student_head).freeze()
    result = fit(trainee, cfg, LossWeights(ce=1.0), dataset, run_dir, resume=resume, desc="teacher", world=world,
                 verifier=verifier)  # fmt: skip
    meta = {"role": "teacher", "data": dataset.fingerprint, "student_aware": student_head is not None}
    return _finish(trainee, result, run_dir, final, meta, world)


def _head_copy(head: ClassHead) -> ClassHead:
    """A trainable copy of ``head``'s parameters (built on the meta device: no initialization to overwrite)."""
    copy = ClassHead(head.embed_dim, head.num_classes, head.spec, device="meta")
    assign_state(copy, {k: v.detach().clone() for k, v in head.state_dict().items()})
    return copy


def default_teacher(cfg: TrainConfig, dataset, world: World = ONE_PROCESS) -> tuple[Path, bool]:
    """The teacher ``edgekd distill`` trains when none is given, cached by (config, data); (file, trained now)."""
    train = lambda run_dir: train_teacher(cfg, dataset, run_dir, resume=True, world=world)  # noqa: E731
    return _cached_run("teachers", "teacher.safetensors", cfg, dataset, train, world)


def default_vanilla(
    cfg: TrainConfig, dataset, embed_dim: int | None = None, world: World = ONE_PROCESS
) -> tuple[Path, bool]:
    """The vanilla student (labels only) ``edgekd distill`` compares its student with: ``cfg`` at ``embed_dim``
    (the distilled student's width), cached like the teacher by (config, data); (file, trained now)."""
    kwargs = {**cfg.model_kwargs, **({"embed_dim": embed_dim} if embed_dim else {})}
    cfg = replace(cfg, model_kwargs=kwargs, stop_after=None)  # stop_after belongs to the distilled student's run

    def train(run_dir: Path) -> Path | None:
        return distill_student(
            cfg, LossWeights(ce=1.0), dataset, None, run_dir, resume=True, method="vanilla", world=world
        )

    return _cached_run("students", "student.safetensors", cfg, dataset, train, world)


def _cached_run(kind: str, final: str, cfg: TrainConfig, dataset, train, world: World) -> tuple[Path, bool]:
    # Keyed by the settings that decide what it trains and by the data: a run with other such settings gets its own
    # folder, one that only runs elsewhere or otherwise fast (--no-compile, --device) reuses it. An interrupted
    # training resumes from its checkpoints on the next call. Under torchrun every rank takes rank 0's folder and
    # answer: a data fingerprint reads file sizes and times, which copies on other nodes need not share.
    run_dir = (
        cache_root()
        / kind
        / world.decide(lambda: json_digest({"cfg": cfg.cache_settings(), "data": dataset.fingerprint}))
    )
    if world.decide((run_dir / final).is_file):
        return run_dir / final, False
    path = train(run_dir)
    if path is None:
        raise EdgekdError(f"training in {run_dir} stopped early; rerun to continue it")
    return path, True


def check_teacher_head(teacher: HeadSpec, student: HeadSpec) -> None:
    """Refuse a teacher head spec (kind, s, m) other than the student's.

    The loss forms teacher and student logits with one head spec (SPEC §3 wants the teacher's own): a teacher trained
    with another scale or margin would be silently rescored.
    """
    if teacher != student:
        t, s = teacher, student
        raise EdgekdError(
            f"the teacher's head is {t.kind} s={t.s:g} m={t.m:g} but the student's is {s.kind} s={s.s:g} m={s.m:g}; "
            f"train the student with the teacher's: --head {t.kind} --scale {t.s:g} --margin {t.m:g}"
        )


def check_teacher_classes(head_classes: int, data_classes: int, whose: str = "the teacher head") -> None:
    """Refuse a shared head over other classes than the training data's: its logits would name other people, and a
    label past its last row would read memory that is not a class (the fused kernels do not bounds-check labels)."""
    if head_classes != data_classes:
        raise EdgekdError(
            f"{whose} has {head_classes} classes but the data has {data_classes}; use the data it was trained on"
        )


def backbone_width(model: str, model_kwargs: dict) -> int:
    """The embedding width ``model`` built with ``model_kwargs`` has, without allocating its weights."""
    with torch.device("meta"):
        return create_model(model, **model_kwargs).embed_dim


def check_teacher_file(path: str, cfg: TrainConfig, dataset, weights: LossWeights, staged: bool) -> None:
    """Everything about a given teacher file that can fail the run, from its header alone, before anything is
    written: the head's classes and spec against the data and the student (when a term reads the teacher's head),
    and the embedding width against the student's where they must agree: SH-KD's I1 starts from this teacher and
    trains it on the temporary student's head; TH-KD's teacher-head and l2e terms read the student's embedding."""
    if Path(path).suffix != ".safetensors":
        return  # a plain state_dict: its architecture is --teacher-model's, checked when it loads
    meta = read_bundle_meta(path)
    spec, head = head_spec_of(meta), meta.get("head") or {}
    if not staged and head and weights.reads_teacher_head:
        check_teacher_classes(int(head["num_classes"]), dataset.num_classes)
        check_teacher_head(spec, HeadSpec(cfg.head, cfg.scale, cfg.margin))
    teacher_width = backbone_width(meta["model"], meta.get("model_kwargs") or {})
    if staged:
        student_width = backbone_width(cfg.model, cfg.model_kwargs)
        if teacher_width != student_width:
            raise EdgekdError(
                f"the teacher {path} embeds to {teacher_width} dims but SH-KD trains it on the student head, which "
                f"reads {student_width}; give the student --model-kwargs '{{\"embed_dim\": {teacher_width}}}' or "
                "a teacher of the student's width"
            )
    elif weights.needs_teacher_width:
        asked = cfg.model_kwargs.get("embed_dim")
        if asked is not None and asked != teacher_width:
            raise EdgekdError(
                f"the student's embed_dim {asked} differs from the teacher's {teacher_width}, but the teacher-head "
                f"and l2e terms read the student's embedding; use embed_dim {teacher_width} or a method without them "
                "(vanilla, kd)"
            )


def verifier_for(cfg: TrainConfig, pair_specs: list[str], run_dir: Path) -> VerifyDuringTraining | None:
    """Verification every ``cfg.eval_every`` steps on ``pair_specs`` (None when off); no pair sets is an error."""
    if cfg.eval_every is None:
        return None
    if not pair_specs:
        raise EdgekdError(
            f"--eval-every {cfg.eval_every} needs verification pairs: give --pairs (a .bin or synthetic:...), or put "
            "the .bin sets (lfw.bin, cfp_fp.bin, ...) beside train.rec"
        )
    return VerifyDuringTraining([create_pairs(spec) for spec in pair_specs], cfg.eval_every, run_dir,
                                resolve_device(cfg.device))  # fmt: skip


def frozen_teacher(
    teacher: Bundle,
    student: Bundle,
    dataset,
    cfg: TrainConfig,
    weights: LossWeights,
    shared_head: ClassHead | None = None,
    world: World = ONE_PROCESS,
) -> Teacher:
    """The frozen teacher as the student sees it: the shared head plus cached (``cfg.teacher_cache``) or live
    embeddings; a head of other classes than the data's, another head spec (kind, s, m) than the student's when a
    term reads teacher logits, or another input size than the student's, is an error."""
    head = shared_head if shared_head is not None else teacher.head
    if head is None and weights.reads_teacher_head:
        raise EdgekdError("the teacher checkpoint has no head; TH-KD and KD need the teacher's classifier")
    if head is not None:
        check_teacher_classes(head.num_classes, dataset.num_classes)
    if head is not None and student.head is not None and weights.reads_teacher_head:
        check_teacher_head(head.spec, student.head.spec)
    if tuple(teacher.cfg.input_size[1:]) != tuple(student.cfg.input_size[1:]):
        raise EdgekdError(
            f"teacher input {teacher.cfg.input_size} and student input {student.cfg.input_size} "
            "differ; train both at the same --image-size"
        )
    frozen = Teacher(teacher.backbone, head)
    if cfg.teacher_cache:
        return frozen.with_cache(dataset, cache_root() / "teacher_outputs", resolve_device(cfg.device), world)
    return frozen


def student_embed_dim(cfg: TrainConfig, teacher: Bundle | None, weights: LossWeights) -> int | None:
    """The student's embedding width when the method fixes it: the teacher's, if a term reads the teacher's head or
    embedding with the student's embedding (th_ce, th_kd, l2e); None leaves the model's own width.

    Both heads read the student's one embedding, as in the official code: a side layer that only the teacher-head
    terms saw would let them fit the frozen head on their own (with C ≤ D_t any C×D_s map is reachable) and would
    constrain nothing the student's head reads. A width asked for with ``model_kwargs`` that differs is an error.
    """
    if teacher is None or not weights.needs_teacher_width:
        return None
    width = teacher.backbone.embed_dim
    asked = cfg.model_kwargs.get("embed_dim")
    if asked is not None and asked != width:
        raise EdgekdError(
            f"the student's embed_dim {asked} differs from the teacher's {width}, but the teacher-head and l2e terms "
            f"read the student's embedding; use embed_dim {width} or a method without them (vanilla, kd)"
        )
    return width


def distill_student(
    cfg: TrainConfig,
    weights: LossWeights,
    dataset,
    teacher: Bundle | None,
    run_dir: Path,
    resume: bool = False,
    method: str = "",
    init_head: ClassHead | None = None,
    shared_head: ClassHead | None = None,
    world: World = ONE_PROCESS,
    verifier: VerifyDuringTraining | None = None,
) -> Path | None:
    """Train a student with ``weights`` from ``teacher`` (None for vanilla); returns its final file. ``verifier``:
    verification during training (``--eval-every``)."""
    final = run_dir / "student.safetensors"
    if final.is_file() and not resume:
        raise EdgekdError(f"{final} exists already; choose a new --out or pass --resume")
    if final.is_file():
        return final
    student = build_trainee(cfg, dataset, embed_dim=student_embed_dim(cfg, teacher, weights), world=world)
    if init_head is not None:
        student.head = _head_copy(init_head)
    frozen = None
    if teacher is not None:
        frozen = frozen_teacher(teacher, student, dataset, cfg, weights, shared_head, world)
    result = fit(student, cfg, weights, dataset, run_dir, teacher=frozen, resume=resume, desc=method or "student",
                 world=world, verifier=verifier)  # fmt: skip
    meta = {"role": "student", "method": method, "data": dataset.fingerprint, "weights": weights.__dict__}
    return _finish(student, result, run_dir, final, meta, world)


def run_sh_kd(
    student_cfg: TrainConfig,
    teacher_cfg: TrainConfig,
    weights: LossWeights,
    dataset,
    out: Path,
    teacher_init: Bundle | None = None,
    fresh_head: bool = False,
    temporary_student: Path | None = None,
    world: World = ONE_PROCESS,
    verifier: VerifyDuringTraining | None = None,
) -> Path | None:
    """SH-KD: I0 temporary student (keeps θ_s) → I1 teacher on frozen θ_s → I2 student distilled from that teacher.

    I2 has two forms. The TH form (``fresh_head=False``) starts the student's head from θ_s and lets the
    teacher-head terms read the teacher's head (θ_s, frozen); the official form (``fresh_head=True``, the official
    README's stage 3) trains a fresh head with KD from the student-aware teacher, its terms set by ``weights``.
    ``temporary_student`` is an I0 student trained elsewhere (a vanilla student of the same settings), reused
    instead of training one in ``out/sh_kd/i0``.

    Each stage checkpoints in its own folder, resumes from its newest checkpoint, and is skipped once its final
    file exists; to rerun from a stage, delete its folder and the folders of the stages after it. I1 depends only
    on θ_s, so both I2 forms can share one ``out`` (I2 goes to ``i2`` or ``i2_fresh``).
    """
    stages = out / "sh_kd"
    i0 = temporary_student
    if i0 is None:
        plain = LossWeights(ce=1.0)
        i0 = distill_student(
            student_cfg, plain, dataset, None, stages / "i0", resume=True, method="sh-kd:i0", world=world
        )
    if i0 is None:
        return None
    theta_s = load_bundle(i0).head
    i1 = train_teacher(
        teacher_cfg, dataset, stages / "i1", student_head=theta_s, resume=True, init=teacher_init, world=world
    )
    if i1 is None:
        return None
    teacher = load_bundle(i1, lazy_head=world.reads_shards)  # frozen: a rank reads its class shard alone
    # I2 on the run's own seed: the same initialization and data order as every other method's student (a study
    # pairs SH-KD with them); I0 shares them too, as the plain student it is.
    return distill_student(
        student_cfg,
        weights,
        dataset,
        teacher,
        stages / ("i2_fresh" if fresh_head else "i2"),
        resume=True,
        method="sh-kd",
        init_head=None if fresh_head else theta_s,
        world=world,
        shared_head=teacher.head,
        verifier=verifier,
    )
