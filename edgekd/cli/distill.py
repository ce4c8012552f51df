"""``edgekd distill``: train a student with vanilla, kd, l2e, th-kd or sh-kd, then evaluate it against its teacher.

With no ``--data`` it runs the built-in demo (``edgekd.cli.options.DEMO``): synthetic identities, a small teacher
trained (and cached) first, a MobileFaceNet student distilled with TH-KD, both evaluated on held-out identities.
On real data it uses the face-standard defaults shown by ``--help``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from edgekd.bundle import read_bundle_meta
from edgekd.cli.options import (
    DEMO,
    TRAIN_SETTINGS,
    ModelName,
    Setting,
    add_options,
    describe_settings,
    invocation_argv,
    non_negative,
    positive,
    resolve_settings,
    save_settings,
    train_config,
)
from edgekd.cli.run_folder import undo_if_nothing_made
from edgekd.distill.methods import METHODS, method_weights, resolve_preset
from edgekd.distill.pipeline import backbone_width, check_teacher_file, training_dataset, verifier_for
from edgekd.distill.run import (
    DistillJob,
    results_table,
    run_distill,
    student_run_dir,
    teacher_config,
    verification_sets,
)
from edgekd.distill.run_report import REPORT_HTML
from edgekd.distributed.launch import start_world, threads_per_rank
from edgekd.errors import EdgekdError
from edgekd.losses import LossWeights, list_loss_backends
from edgekd.train.config import TrainConfig
from edgekd.utils.out_paths import check_output_dir
from edgekd.utils.threads import set_threads

SETTINGS = TRAIN_SETTINGS + [
    Setting("method", click.Choice(list(METHODS)), "KD method", default="th-kd"),
    Setting(
        "preset",
        click.STRING,
        "weight preset: th-kd paper|code|face|kdth, sh-kd face|code|official|kdeth",
        shown_default="face heads: th-kd paper, sh-kd face (study v1); classification: th-kd paper, sh-kd "
        "official, the paper's (study v3 found no gain from kdth); why: edgekd/distill/methods.py",
    ),
    Setting(
        "teacher",
        click.Path(dir_okay=False, exists=True),
        "teacher checkpoint (.safetensors)",
        shown_default="train one here",
        path="file",
    ),
    Setting("teacher_model", ModelName(), "architecture of a teacher trained here", default="r50"),
    Setting(
        "teacher_epochs", positive(float), "epochs of a teacher trained here", shown_default="the student's --epochs"
    ),
    Setting("teacher_lr", positive(float), "learning rate of a teacher trained here", shown_default="--lr"),
    Setting("w_ce", non_negative(float), "weight of CE on the student head", shown_default="the preset's"),
    Setting("w_kd", non_negative(float), "weight of KL(teacher ‖ student head)", shown_default="the preset's"),
    Setting(
        "w_th_ce", non_negative(float), "weight of CE through the frozen teacher head", shown_default="the preset's"
    ),
    Setting(
        "w_th_kd", non_negative(float), "weight of KL(teacher ‖ teacher head on student)", shown_default="the preset's"
    ),
    Setting("w_l2e", non_negative(float), "weight of the normalized-embedding L2 term", shown_default="the preset's"),
    Setting("temperature", positive(float), "KD temperature T (of kd)", shown_default="the preset's"),
    Setting(
        "th_temperature", positive(float), "temperature T_th of th_kd", shown_default="--temperature, else the preset's"
    ),
    Setting(
        "loss_backend",
        click.Choice(list_loss_backends()),
        "shared-head loss backend (auto: triton on CUDA, chunked elsewhere)",
        resumable=True,
    ),
    Setting(
        "teacher_cache",
        click.BOOL,
        "cache the teacher's embeddings once instead of running it every step",
        resumable=True,
        flag="--teacher-cache/--no-teacher-cache",
    ),
    Setting(
        "pairs",
        click.STRING,
        "verification pairs of the final evaluation: synthetic[:k=v,...] or an insightface .bin",
        resumable=True,
        shown_default="synthetic --data's own; otherwise every .bin beside --data (lfw, cfp_fp, agedb_30, ...), "
        "checked before training; none there: no verification",
        path="spec",
    ),
    Setting(
        "vanilla_baseline",
        click.BOOL,
        "also evaluate the vanilla student of these settings (trained once, then cached like the teacher)",
        default=False,
        resumable=True,
        flag="--vanilla-baseline/--no-vanilla-baseline",
    ),
    Setting(
        "eval",
        click.BOOL,
        "evaluate teacher and student at the end",
        default=True,
        resumable=True,
        flag="--eval/--no-eval",
    ),
    Setting("out", click.Path(file_okay=False), "run folder", default="runs/distill", resumable=True, path="file"),
]


@click.command("distill")
@add_options(SETTINGS, DEMO)
def command(**kwargs) -> None:
    """Distill a student from a teacher with a chosen method, then compare them on held-out data.

    With no --data this is the built-in demo (synthetic identities, a small cached teacher); the demo's values
    are marked "demo" below. An interrupted run continues with `edgekd distill --out OUT --resume`.
    """
    values, resume = resolve_settings("distill", kwargs, SETTINGS, DEMO, default_out="runs/distill")
    run_distill_settings(values, resume, click.echo, invocation_argv())


def run_distill_settings(values: dict, resume: bool, echo: Callable[[str], None], argv: list[str] | None) -> dict:
    """Run ``edgekd distill`` with resolved settings (``resolve_settings``): check everything that needs no training,
    write the run folder, train, evaluate, print the table; returns the report (empty on ranks other than 0, or
    when the run stopped early). ``argv``: the command line that ``--nproc`` relaunches as ranks (None: one process
    only, the Python API's case)."""
    check_output_dir(values["out"])  # before any work: a file, a loop or a read-only place fails here
    cfg = train_config(values)
    if argv is None and values["nproc"] > 1:
        raise EdgekdError("nproc > 1 starts processes from the command line; run `edgekd distill --nproc N` instead")
    world = start_world(values["nproc"], cfg.device, cfg.batch_size, argv or [], cfg.loss_backend)
    if world is None:
        return {}  # this process ran the command as --nproc ranks, which printed everything
    echo = echo if world.is_main else _quiet
    overrides = {term: values[f"w_{term}"] for term in ("ce", "kd", "th_ce", "th_kd", "l2e")}
    # One temperature given is both KL terms' (a matched T); --th-temperature sets th_kd's apart.
    t_th = values["temperature"] if values["th_temperature"] is None else values["th_temperature"]
    face = cfg.head != "linear"
    preset = resolve_preset(values["method"], values["preset"], face)
    weights = method_weights(
        values["method"], preset, face=face, overrides={**overrides, "T": values["temperature"], "T_th": t_th}
    )
    out = Path(values["out"])
    job = DistillJob(
        cfg=cfg,
        method=values["method"],
        weights=weights,
        out=out,
        teacher_cfg=teacher_config(cfg, values["teacher_model"], values["teacher_epochs"], values["teacher_lr"]),
        teacher_path=values["teacher"],
        pairs=values["pairs"],
        evaluate=values["eval"],
        resume=resume,
        fresh_head=preset in METHODS[values["method"]].fresh_head_presets,
        vanilla_baseline=values["vanilla_baseline"],
    )
    set_threads(threads_per_rank(values["threads"]))
    dataset = training_dataset(cfg)  # a bad --data fails here, before the run folder is written
    # So do the evaluation's pair sets: a broken .bin must not cost a whole training run.
    job.pairs = verification_sets(cfg.data, values["pairs"]) if values["eval"] and face else []
    job.verifier = verifier_for(cfg, job.pairs, student_run_dir(job))
    if values["teacher"]:  # a teacher that cannot serve this run fails before the run folder is written
        check_teacher_file(values["teacher"], cfg, dataset, weights, staged=METHODS[values["method"]].staged)
    elif METHODS[values["method"]].reads_teacher_file:
        _check_width_of_teacher_trained_here(cfg, job.teacher_cfg, values["method"], weights)
    echo(describe_settings(_as_used(values), SETTINGS))
    if values["eval"] and face and not job.pairs:
        echo(
            f"note: no verification .bin files beside {cfg.data} and no --pairs: this run ends without a "
            "verification evaluation (--pairs FILE.bin gives it one)"
        )
    with undo_if_nothing_made(out, enabled=world.is_main):
        if world.is_main:
            save_settings(out, "distill", values, SETTINGS)
        report = run_distill(job, world, dataset, log=echo)
    if not report:
        return {}
    if report.get("results"):
        echo("\n" + results_table(report))
    plots = ", ".join(report["plots"].values())
    echo(f"\nstudent: {report['student']}  ({report['seconds']:.0f} s; report {out / REPORT_HTML}; plots {plots})")
    return report


def _check_width_of_teacher_trained_here(
    cfg: TrainConfig, teacher_cfg: TrainConfig, method: str, weights: LossWeights
) -> None:
    """A student width (--embedding-size) the teacher trained here cannot share a head with is a one-line error
    before that teacher trains: the teacher-head and l2e terms read the student's embedding with the teacher's head
    (SPEC §3), and a teacher trained here has its model's own width."""
    asked = cfg.model_kwargs.get("embed_dim")
    if asked is None or not weights.needs_teacher_width:
        return
    width = backbone_width(teacher_cfg.model, teacher_cfg.model_kwargs)
    if asked != width:
        raise EdgekdError(
            f"the student's embed_dim {asked} (--embedding-size or --model-kwargs) differs from the {width} of the "
            f"teacher trained here (--teacher-model {teacher_cfg.model}), but {method}'s teacher-head and l2e terms "
            f"read the student's embedding; use --embedding-size {width}, a --teacher of width {asked}, or a method "
            "without them (vanilla, kd)"
        )


def _as_used(values: dict) -> dict:
    """The settings as the run uses them, for its log line: an edgekd teacher file given with --teacher decides its
    own architecture (not --teacher-model), and is not trained here unless the method trains its own teacher from it
    (SH-KD's I1), so --teacher-epochs and --teacher-lr do not apply to it."""
    if not values["teacher"] or Path(values["teacher"]).suffix != ".safetensors":
        return values  # no file, or a plain state_dict whose architecture --teacher-model names
    shown = {**values, "teacher_model": read_bundle_meta(values["teacher"]).get("model", values["teacher_model"])}
    if not METHODS[values["method"]].staged:
        shown["teacher_epochs"] = shown["teacher_lr"] = None  # describe_settings leaves None out
    return shown


def _quiet(*args, **kwargs) -> None:
    """``click.echo`` on ranks other than 0: rank 0 speaks for the run."""
