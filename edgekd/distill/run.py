"""``run_distill``: the whole ``edgekd distill`` job — teacher, student (or SH-KD stages), evaluation, report, plots."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from edgekd.atomic import write_json
from edgekd.bundle import load_bundle
from edgekd.data import bin_files_beside, check_pairs, create_dataset, create_pairs, resolve_data
from edgekd.distill.methods import get_method
from edgekd.distill.pipeline import (
    default_teacher,
    default_vanilla,
    distill_student,
    run_sh_kd,
    student_embed_dim,
    training_dataset,
)
from edgekd.distill.run_report import write_run_report
from edgekd.distributed.launch import ONE_PROCESS, World
from edgekd.eval.metrics import far_rule_reason
from edgekd.eval.report import REPORT_FARS, classify_bundle, format_table, parameter_count, value_ci, verify_bundle
from edgekd.eval.roc_plot import plot_roc
from edgekd.losses import LossWeights
from edgekd.train.config import TrainConfig
from edgekd.train.curves import plot_loss_curves
from edgekd.train.verification import VerifyDuringTraining


@dataclass
class DistillJob:
    """One ``edgekd distill`` run: the student's and the teacher's settings, the method and where it all goes."""

    cfg: TrainConfig
    method: str
    weights: LossWeights
    out: Path
    teacher_cfg: TrainConfig
    teacher_path: str | None = None
    pairs: list[str] | None = None  # the verification sets of the final evaluation; None: verification_sets(cfg.data)
    evaluate: bool = True
    resume: bool = False
    fresh_head: bool = False  # SH-KD's official final stage: a fresh student head (see run_sh_kd)
    vanilla_baseline: bool = False  # also train (or reuse from the cache) the vanilla student, for the table
    verifier: VerifyDuringTraining | None = None  # --eval-every: the student scored while it trains


def student_run_dir(job: DistillJob) -> Path:
    """The folder the final student trains in: ``student``, or SH-KD's last stage."""
    if get_method(job.method).staged:
        return job.out / "sh_kd" / ("i2_fresh" if job.fresh_head else "i2")
    return job.out / "student"


def teacher_config(cfg: TrainConfig, model: str, epochs: float | None, lr: float | None) -> TrainConfig:
    """The student's settings with the teacher's architecture, length (default: the student's) and learning rate."""
    return replace(
        cfg, model=model, model_kwargs={}, epochs=epochs or cfg.epochs, steps=None, lr=lr or cfg.lr, stop_after=None
    )


def verification_sets(data: str, pairs: str | None) -> list[str]:
    """The pair sets a face run's final evaluation reads, each checked (``check_pairs``) so that a missing or broken
    file, or synthetic pairs that cannot be drawn, stop the run before it trains, not after.

    ``pairs`` when given; else the held-out pairs of synthetic ``data``; else, as arcface_torch evaluates, every
    ``.bin`` set beside the data (lfw, cfp_fp, agedb_30, ...). Empty when there are none.
    """
    if pairs:
        specs = [pairs]
    elif resolve_data(data).kind == "synthetic":
        specs = [data]
    else:
        specs = [str(path) for path in bin_files_beside(data)]
    for spec in specs:
        check_pairs(spec)
    return specs


def evaluate_pair(
    named: dict[str, Path], cfg: TrainConfig, pairs: list[str], combined: float | None = None
) -> tuple[list[dict], dict]:
    """Result rows per checkpoint (verification on face heads, one row per pair set of ``pairs`` and checkpoint;
    top-1 on linear heads) and the ROC curves.

    ``combined``: α of the TH-KD paper's combined prediction p′ = (1 − α)·p_s + α·p_th; on linear heads the student
    then gets a second row, ``student p′``, read through the teacher's head (``named["teacher"]``).
    """
    bundles = {role: load_bundle(path) for role, path in named.items()}
    if cfg.head != "linear":
        return _verify(bundles, cfg, pairs)
    rows = []
    test_set = create_dataset(cfg.data, split="test", image_size=cfg.image_size)
    for role, bundle in bundles.items():
        row = {"role": role, "model": bundle.cfg.name, "params": parameter_count(bundle.backbone)}
        shared = bundles["teacher"].head if role == "student" and combined is not None else None
        result = classify_bundle(bundle, test_set, device=cfg.device, shared_head=shared, alpha=combined or 0.0)
        rows.append({**row, "top1": result["top1"]})
        if "top1_p′" in result:
            rows.append({**row, "role": "student p′", "top1": result["top1_p′"]})
    return rows, {}


def _verify(bundles: dict, cfg: TrainConfig, pairs: list[str]) -> tuple[list[dict], dict]:
    """Verification rows, pair set by pair set (one in memory at a time), and ROC curves named by set and role."""
    rows, curves = [], {}
    size = cfg.image_size or next(iter(bundles.values())).cfg.input_size[1]  # the size the models were trained at
    for spec in pairs:
        pair_set = create_pairs(spec, image_size=size)
        for role, bundle in bundles.items():
            result = verify_bundle(bundle, pair_set, device=cfg.device)
            label = f"{role} ({bundle.cfg.name})"
            curves[f"{pair_set.name}: {label}" if len(pairs) > 1 else label] = result.pop("roc")
            row = {"pairs": pair_set.name, "role": role, "model": bundle.cfg.name}
            row["params"] = parameter_count(bundle.backbone)
            row["acc"] = result["accuracy"]
            row["acc_ci"] = list(result["accuracy_ci"])
            resolved = [far for far in REPORT_FARS if str(far) in result["tar_ci"]]  # metrics.resolvable_fars' rule
            for far in resolved:
                row[f"tar@{far:g}"] = result["tar_at_far"][str(far)]
            row["tar_ci"] = {f"tar@{far:g}": list(result["tar_ci"][str(far)]) for far in resolved}
            row["impostor_pairs"] = result["impostor_pairs"]
            rows.append(row)
    return rows, curves


def _teacher(job: DistillJob, dataset, log: Callable[[str], None], world: World) -> str | None:
    """The teacher checkpoint: given, or the default one trained here (or found in the cache)."""
    if not get_method(job.method).reads_teacher_file or job.teacher_path is not None:
        return job.teacher_path
    t = job.teacher_cfg
    length = f"{t.epochs:g} epoch" + ("" if t.epochs == 1 else "s")
    path, trained = default_teacher(t, dataset, world)
    verb = "trained" if trained else "reusing the cached"
    log(f"teacher: {verb} {t.model} ({length}) at {path}")
    return str(path)


def _combined_alpha(job: DistillJob) -> float | None:
    """α^TH of the paper's p′ for a TH-KD student trained with CE through the teacher head: th_ce's share of the
    CE weight (0.5 under the ``paper`` preset); None when there is no such term or the teacher head is not TH-KD's."""
    w = job.weights
    if not get_method(job.method).combined_prediction or not w.th_ce:
        return None
    return w.th_ce / (w.ce + w.th_ce)


def _vanilla(job: DistillJob, dataset, teacher, log: Callable[[str], None], world: World) -> Path:
    """The vanilla student at the distilled student's width, trained here or found in the cache."""
    width = student_embed_dim(job.cfg, teacher, job.weights) if teacher is not None else None
    path, trained = default_vanilla(job.cfg, dataset, embed_dim=width, world=world)
    log(f"vanilla student: {'trained' if trained else 'reusing the cached'} {job.cfg.model} at {path}")
    return path


def run_distill(job: DistillJob, world: World = ONE_PROCESS, dataset=None, log: Callable[[str], None] = print) -> dict:
    """Train (or reuse) a teacher, distill the student with the job's method, evaluate both; returns the report.

    ``world``: the processes that train together (``edgekd.distributed.start_world``); every rank trains and rank 0
    alone evaluates: the others return an empty report.
    """
    started = time.perf_counter()
    dataset = dataset if dataset is not None else training_dataset(job.cfg)
    face = job.cfg.head != "linear"
    if job.evaluate and face and job.pairs is None:
        job = replace(job, pairs=verification_sets(job.cfg.data, None))
    evaluates = job.evaluate and (bool(job.pairs) or not face)  # a face run without pair sets has nothing to verify
    spec = get_method(job.method)
    teacher_path = _teacher(job, dataset, log, world)
    # In a world of several ranks each reads only its class shard of the frozen teacher's head from the file. A staged
    # method's given teacher is the start of its own teacher's training instead (read whole below).
    read = teacher_path and not spec.staged
    # --teacher-model names the architecture of a plain arcface_torch state_dict given as --teacher (not --model,
    # the student's).
    teacher = (
        load_bundle(
            teacher_path, model=job.teacher_cfg.model, lazy_head=world.reads_shards, model_option="--teacher-model"
        )
        if read
        else None
    )
    log(f"distilling {job.cfg.model} with {job.method}: {job.weights.describe()}")
    wants_vanilla = evaluates and job.vanilla_baseline and spec.needs_teacher  # vanilla is its own baseline
    vanilla = temporary = None
    if spec.staged:
        if wants_vanilla:  # SH-KD's I0 is this student (labels only, the same settings, seed and data): trained once
            vanilla = temporary = _vanilla(job, dataset, None, log, world)
        init = load_bundle(teacher_path) if teacher_path else None
        student_path = run_sh_kd(
            job.cfg, job.teacher_cfg, job.weights, dataset, job.out, teacher_init=init, fresh_head=job.fresh_head,
            temporary_student=temporary, world=world, verifier=job.verifier,
        )  # fmt: skip
        teacher_path = str(job.out / "sh_kd" / "i1" / "teacher.safetensors")
        temporary = temporary or job.out / "sh_kd" / "i0" / "student.safetensors"
    else:
        student_path = distill_student(
            job.cfg, job.weights, dataset, teacher, student_run_dir(job), resume=job.resume, method=job.method,
            world=world, verifier=job.verifier,
        )  # fmt: skip
    if student_path is None:
        again = shlex.join(["edgekd", "distill", "--out", str(job.out), "--resume"])
        log(f"stopped after --stop-after steps; continue with `{again}`")
        return {}
    if wants_vanilla and vanilla is None:
        vanilla = _vanilla(job, dataset, teacher, log, world)  # trained by every rank, like the student
    if not world.is_main:
        return {}  # rank 0 alone evaluates, plots and writes the report
    report = {
        "method": job.method,
        "weights": job.weights.__dict__,
        "student": str(student_path),
        "teacher": teacher_path,
        "config": job.cfg.to_dict(),
    }
    report["plots"] = {"loss": str(_plot_losses(job, teacher_path, student_path, temporary))}
    curves = {}  # the ROC curves drawn below; the run's report reads their AUC and EER
    if evaluates:
        named = {"teacher": Path(teacher_path)} if teacher_path else {}
        if vanilla is not None:
            named["vanilla"] = vanilla
        named["student"] = student_path
        report["results"], curves = evaluate_pair(named, job.cfg, job.pairs, _combined_alpha(job))
        if curves:
            plot_roc(curves, job.out / "roc.png", title="teacher vs student (verification pairs)")
            report["plots"]["roc"] = str(job.out / "roc.png")
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json(job.out / "results.json", report)
    log(f"run report: {write_run_report(job.out, curves, results_table(report))} (and report.md beside it)")
    return report


def _plot_losses(job: DistillJob, teacher_path: str | None, student_path: Path, temporary: Path | None) -> Path:
    """``out/loss.png``: the training loss of the student and of every model trained for it (``temporary``: SH-KD's
    I0 student)."""
    runs = {"student": Path(student_path).parent / "metrics.jsonl"}
    if teacher_path:
        runs["teacher"] = Path(teacher_path).parent / "metrics.jsonl"
    if temporary is not None:
        runs["I0 temporary student"] = Path(temporary).parent / "metrics.jsonl"
    path = job.out / "loss.png"
    plot_loss_curves({name: p for name, p in runs.items() if p.is_file()}, path)
    return path


def results_table(report: dict) -> str:
    """The comparison table ``edgekd distill`` prints: accuracies and TARs in percent, each with its 95 % interval
    (``acc_ci``, ``tar_ci``) where the row has one; TAR columns only at the FARs the pair set resolves."""
    rows = report.get("results", [])
    if not rows:
        return ""
    skip = ("pairs", "role", "model", "params", "acc_ci", "tar_ci", "impostor_pairs")
    metrics = list(dict.fromkeys(k for row in rows for k in row if k not in skip))  # every row's, in order
    names = {
        "vanilla": "vanilla student",
        "student": f"{report['method']} student",
        "student p′": f"{report['method']} student p′",
    }

    def interval(row: dict, key: str):
        return row.get("acc_ci") if key == "acc" else row.get("tar_ci", {}).get(key)

    shown = [
        {
            **row,
            "role": names.get(row["role"], row["role"]),
            "params": f"{row['params'] / 1e6:.2f} M",
            **{k: value_ci(row[k], interval(row, k)) for k in metrics if k in row},
        }
        for row in rows
    ]
    sets = {row["pairs"] for row in rows if "pairs" in row}
    columns = [("pairs", "pairs")] if len(sets) > 1 else []  # a column only when the rows differ in it
    columns += [("role", "role"), ("model", "model"), ("params", "params")]
    columns += [(k, f"{k} %") for k in metrics]
    table = format_table(shown, columns)
    counts = sorted({row["impostor_pairs"] for row in rows if "impostor_pairs" in row})
    if counts:  # verification rows: say what the brackets are and why FAR columns may be missing
        table += "\n[low, high]: 95 % intervals. " + "; ".join(far_rule_reason(n) for n in counts)
    return f"verification on {sets.pop()}\n{table}" if len(sets) == 1 else table
