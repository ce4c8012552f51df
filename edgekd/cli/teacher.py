"""``edgekd teacher``: train or fine-tune a teacher; ``--student-head`` trains an SH-KD student-aware teacher."""

from __future__ import annotations

from pathlib import Path

import click

from edgekd.cli.distill import DEMO
from edgekd.cli.options import split_config, train_options

# The demo's data and head settings, with the demo teacher's architecture and length.
BASE = {
    **{
        k: v
        for k, v in DEMO.items()
        if k in ("data", "scale", "margin", "batch_size", "lr", "weight_decay", "warmup_steps", "checkpoint_every")
    },
    "model": DEMO["teacher_model"],
    "epochs": DEMO["teacher_epochs"],
    "out": "runs/teacher",
}


@click.command("teacher")
@train_options
@click.option(
    "--student-head",
    type=click.Path(dir_okay=False),
    default=None,
    help="student checkpoint whose head is copied in and frozen (SH-KD stage I1)",
)
@click.option(
    "--init",
    "init",
    type=click.Path(dir_okay=False),
    default=None,
    help="start from this teacher checkpoint (fine-tuning) instead of random weights",
)
@click.option("--out", default=None, help="run folder (default runs/teacher); the result is OUT/teacher.safetensors")
def command(**kwargs) -> None:
    """Train a teacher with CE on its own head (or on a frozen student head for SH-KD)."""
    from edgekd.bundle import load_bundle
    from edgekd.distill.pipeline import train_teacher, training_dataset
    from edgekd.errors import EdgekdError

    cfg, opts = split_config(kwargs, BASE, ("student_head", "init", "out", "resume"))
    dataset = training_dataset(cfg)
    student_head = None
    if opts.get("student_head"):
        student_head = load_bundle(opts["student_head"]).head
        if student_head is None:
            raise EdgekdError(f"{opts['student_head']} has no head to share; pass a student checkpoint edgekd wrote")
    init = load_bundle(opts["init"]) if opts.get("init") else None
    out = Path(opts["out"])
    if (out / "teacher.safetensors").exists() and not opts.get("resume"):
        raise EdgekdError(f"{out}/teacher.safetensors exists already; choose a new --out")
    path = train_teacher(cfg, dataset, out, student_head=student_head, resume=bool(opts.get("resume")), init=init)
    if path is None:
        click.echo(f"stopped after --stop-after steps; continue with --resume --out {out}")
    else:
        click.echo(f"teacher: {path}")
