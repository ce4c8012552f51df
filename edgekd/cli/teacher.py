"""``edgekd teacher``: train or fine-tune a teacher; ``--student-head`` trains an SH-KD student-aware teacher."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import click

from edgekd.bundle import load_bundle
from edgekd.cli.options import (
    DEMO,
    TRAIN_SETTINGS,
    Setting,
    add_options,
    describe_settings,
    invocation_argv,
    resolve_settings,
    resume_line,
    save_settings,
    train_config,
)
from edgekd.cli.run_folder import undo_if_nothing_made
from edgekd.distill.pipeline import check_teacher_classes, train_teacher, training_dataset, verifier_for
from edgekd.distill.run import verification_sets
from edgekd.distill.run_report import write_run_report
from edgekd.distributed.launch import start_world, threads_per_rank
from edgekd.errors import EdgekdError
from edgekd.utils.out_paths import check_output_dir
from edgekd.utils.threads import set_threads

# A teacher is an iResNet-50 on real data; the demo's teacher is its small r_tiny at the demo's teacher length.
SETTINGS = [replace(s, default="r50") if s.key == "model" else s for s in TRAIN_SETTINGS] + [
    Setting(
        "student_head",
        click.Path(dir_okay=False, exists=True),
        "student checkpoint whose head is copied in and frozen (SH-KD stage I1)",
        path="file",
    ),
    Setting(
        "init",
        click.Path(dir_okay=False, exists=True),
        "start from this checkpoint (fine-tuning): an edgekd .safetensors, or an arcface_torch model.pt of --model",
        shown_default="random weights",
        path="file",
    ),
    Setting(
        "out",
        click.Path(file_okay=False),
        "run folder; the result is OUT/teacher.safetensors",
        default="runs/teacher",
        resumable=True,
        path="file",
    ),
]
TEACHER_DEMO = {
    **{k: v for k, v in DEMO.items() if k not in ("teacher_model", "teacher_epochs")},
    "model": DEMO["teacher_model"],
    "epochs": DEMO["teacher_epochs"],
}


@click.command("teacher")
@add_options(SETTINGS, TEACHER_DEMO)
def command(**kwargs) -> None:
    """Train a teacher with CE on its own head (or on a frozen student head for SH-KD).

    With no --data it trains the demo's teacher on the built-in identities. An interrupted run continues with
    `edgekd teacher --out OUT --resume`.
    """
    values, resume = resolve_settings("teacher", kwargs, SETTINGS, TEACHER_DEMO, default_out="runs/teacher")
    run_teacher_settings(values, resume, click.echo, invocation_argv())


def run_teacher_settings(
    values: dict, resume: bool, echo: Callable[[str], None], argv: list[str] | None
) -> Path | None:
    """Run ``edgekd teacher`` with resolved settings (``resolve_settings``); returns the teacher file (None on ranks
    other than 0 or when stopped early). ``argv``: the command line ``--nproc`` relaunches (None: one process only,
    the Python API's case)."""
    check_output_dir(values["out"])  # before any work: a file, a loop or a read-only place fails here
    cfg = train_config(values)
    if argv is None and values["nproc"] > 1:
        raise EdgekdError("nproc > 1 starts processes from the command line; run `edgekd teacher --nproc N` instead")
    world = start_world(values["nproc"], cfg.device, cfg.batch_size, argv or [], cfg.loss_backend)
    if world is None:
        return None  # this process ran the command as --nproc ranks, which printed everything
    out = Path(values["out"])
    if (out / "teacher.safetensors").exists() and not resume:
        raise EdgekdError(f"{out}/teacher.safetensors exists already; choose a new --out")
    student_head = None
    if values["student_head"]:
        student_head = load_bundle(values["student_head"]).head
        if student_head is None:
            raise EdgekdError(f"{values['student_head']} has no head to share; pass a student checkpoint edgekd wrote")
    # --model names the architecture of a plain arcface_torch state_dict given as --init.
    init = load_bundle(values["init"], model=values["model"]) if values["init"] else None
    set_threads(threads_per_rank(values["threads"]))
    dataset = training_dataset(cfg)  # a bad --data fails here, before the run folder is written
    if student_head is not None:
        check_teacher_classes(
            student_head.num_classes, dataset.num_classes, whose=f"the student head {values['student_head']}"
        )
    # --eval-every scores the teacher on the .bin sets beside train.rec (synthetic data: its held-out pairs).
    verifier = verifier_for(cfg, verification_sets(cfg.data, None) if cfg.eval_every else [], out)
    if world.is_main:
        echo(describe_settings(values, SETTINGS))
    with undo_if_nothing_made(out, enabled=world.is_main):
        if world.is_main:
            save_settings(out, "teacher", values, SETTINGS)
        path = train_teacher(
            cfg, dataset, out, student_head=student_head, resume=resume, init=init, world=world, verifier=verifier
        )
    if not world.is_main:
        return None
    if path is None:
        echo(f"stopped after --stop-after steps; continue with `{resume_line('teacher', out)}`")
    else:
        echo(f"teacher: {path}")
        echo(f"run report: {write_run_report(out)} (and report.md beside it)")
    return path
