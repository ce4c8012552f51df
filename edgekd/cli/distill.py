"""``edgekd distill``: train a student with vanilla, kd, l2e, th-kd or sh-kd, then evaluate it against its teacher.

With no arguments it runs the built-in demo: synthetic identities, a small teacher trained (and cached)
first, a MobileFaceNet student distilled with TH-KD, both evaluated on held-out identities.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from edgekd.cli.options import split_config, train_options
from edgekd.distill.methods import METHODS, method_weights
from edgekd.losses import list_loss_backends

# The built-in default run (`make demo`): sized to finish within 10 minutes on a 2-core CPU, teacher included.
# 200 synthetic identities at 32x32 keep MobileFaceNet's step cheap on a CPU. The scale is 16, not the face
# default 64: with C = 200 classes a fixed-scale head needs only s ≈ √2·ln(C − 1) ≈ 7.5 (AdaCos), and s = 64
# with m = 0.5 barely moves in a few hundred steps; the margin is lowered to 0.3 with it.
DEMO = {
    "data": "synthetic:identities=200,images_per_identity=20,image_size=32,pairs=2000,pair_identities=200",
    "model": "mbf",
    "scale": 16.0,
    "margin": 0.3,
    "batch_size": 64,
    "epochs": 4.0,
    "lr": 0.1,
    "weight_decay": 5e-4,
    "warmup_steps": 20,
    "checkpoint_every": 100,
    "method": "th-kd",
    "teacher_model": "r_tiny",
    "teacher_epochs": 8.0,
    "out": "runs/distill",
}

COMMAND_KEYS = (
    "method",
    "preset",
    "teacher",
    "teacher_model",
    "teacher_epochs",
    "teacher_lr",
    "w_ce",
    "w_kd",
    "w_th_ce",
    "w_th_kd",
    "w_l2e",
    "temperature",
    "loss_backend",
    "no_teacher_cache",
    "pairs",
    "no_eval",
    "out",
    "resume",
)


@click.command("distill")
@train_options
@click.option("--method", type=click.Choice(list(METHODS)), default=None, help="KD method (default th-kd)")
@click.option(
    "--preset",
    default=None,
    help="weight preset: th-kd paper|code|face, sh-kd face|code (default by head family: edgekd/distill/methods.py)",
)
@click.option(
    "--teacher",
    type=click.Path(dir_okay=False),
    default=None,
    help="teacher checkpoint (.safetensors); default: train a small teacher on --data first (cached)",
)
@click.option("--teacher-model", default=None, help="architecture of a teacher trained here (default r_tiny)")
@click.option("--teacher-epochs", type=float, default=None, help="epochs of a teacher trained here")
@click.option("--teacher-lr", type=float, default=None, help="learning rate of a teacher trained here")
@click.option("--w-ce", type=float, default=None, help="weight of CE on the student head")
@click.option("--w-kd", type=float, default=None, help="weight of KL(teacher ‖ student head)")
@click.option("--w-th-ce", type=float, default=None, help="weight of CE through the frozen teacher head")
@click.option("--w-th-kd", type=float, default=None, help="weight of KL(teacher ‖ teacher head on student)")
@click.option("--w-l2e", type=float, default=None, help="weight of the normalized-embedding L2 term")
@click.option("--temperature", type=float, default=None, help="KD temperature T")
@click.option(
    "--loss-backend",
    type=click.Choice(list_loss_backends()),
    default=None,
    help="shared-head loss backend (auto: triton on CUDA, chunked elsewhere)",
)
@click.option("--no-teacher-cache", is_flag=True, default=None, help="run the teacher every step instead of caching")
@click.option("--pairs", default=None, help="verification pairs for the final evaluation (default: from --data)")
@click.option("--no-eval", is_flag=True, default=None, help="skip the final evaluation")
@click.option("--out", default=None, help="run folder (default runs/distill)")
def command(**kwargs) -> None:
    """Distill a student from a teacher with a chosen method, then compare them on held-out data."""
    from edgekd.distill.run import results_table, run_distill

    cfg, opts = split_config(kwargs, DEMO, COMMAND_KEYS)
    if opts.get("loss_backend"):
        cfg = replace(cfg, loss_backend=opts["loss_backend"])
    if opts.get("no_teacher_cache"):
        cfg = replace(cfg, teacher_cache=False)
    overrides = {
        "ce": opts.get("w_ce"),
        "kd": opts.get("w_kd"),
        "th_ce": opts.get("w_th_ce"),
        "th_kd": opts.get("w_th_kd"),
        "l2e": opts.get("w_l2e"),
        "T": opts.get("temperature"),
    }
    weights = method_weights(opts["method"], opts.get("preset"), face=cfg.head != "linear", overrides=overrides)
    report = run_distill(
        cfg,
        opts["method"],
        weights,
        Path(opts["out"]),
        teacher_path=opts.get("teacher"),
        teacher_model=opts["teacher_model"],
        teacher_epochs=opts["teacher_epochs"],
        teacher_lr=opts.get("teacher_lr"),
        pairs=opts.get("pairs"),
        evaluate=not opts.get("no_eval"),
        resume=bool(opts.get("resume")),
        log=click.echo,
    )
    if report.get("results"):
        click.echo("\n" + results_table(report))
    click.echo(f"\nstudent: {report['student']}  ({report['seconds']:.0f} s; report in {opts['out']}/results.json)")
