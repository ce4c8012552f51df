"""``run_distill``: the whole ``edgekd distill`` job — teacher, student (or SH-KD stages), evaluation, report."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from edgekd.atomic import write_json
from edgekd.bundle import load_bundle
from edgekd.distill.pipeline import default_teacher, distill_student, run_sh_kd, training_dataset
from edgekd.errors import EdgekdError
from edgekd.eval.report import REPORT_FARS, classify_bundle, format_table, parameter_count, verify_bundle
from edgekd.losses import LossWeights
from edgekd.train.config import TrainConfig


def teacher_config(cfg: TrainConfig, model: str, epochs: float, lr: float | None) -> TrainConfig:
    """The student's settings with the teacher's architecture, length and learning rate."""
    return replace(cfg, model=model, model_kwargs={}, epochs=epochs, steps=None, lr=lr or cfg.lr, stop_after=None)


def evaluate_pair(named: dict[str, Path], cfg: TrainConfig, dataset, pairs: str | None) -> list[dict]:
    """One result row per checkpoint: verification (face heads) or top-1 on the test split (linear heads)."""
    from edgekd.data import create_dataset, create_pairs

    rows = []
    face = cfg.head != "linear"
    pair_set = create_pairs(pairs or cfg.data, image_size=cfg.image_size) if face else None
    test_set = None if face else create_dataset(cfg.data, split="test", image_size=cfg.image_size)
    for role, path in named.items():
        bundle = load_bundle(path)
        row = {"role": role, "model": bundle.cfg.name, "params": parameter_count(bundle.backbone)}
        if face:
            result = verify_bundle(bundle, pair_set, device=cfg.device)
            row["acc"] = result["accuracy"]
            for far in REPORT_FARS:
                row[f"tar@{far:g}"] = result["tar_at_far"].get(str(far), float("nan"))
        else:
            row.update(classify_bundle(bundle, test_set, device=cfg.device))
        rows.append(row)
    return rows


def run_distill(
    cfg: TrainConfig,
    method: str,
    weights: LossWeights,
    out: Path,
    teacher_path: str | None,
    teacher_model: str,
    teacher_epochs: float,
    teacher_lr: float | None,
    pairs: str | None,
    evaluate: bool,
    resume: bool,
    log: Callable[[str], None] = print,
) -> dict:
    """Train (or reuse) a teacher, distill the student with ``method``, evaluate both; returns the report."""
    started = time.perf_counter()
    dataset = training_dataset(cfg)
    t_cfg = teacher_config(cfg, teacher_model, teacher_epochs, teacher_lr)
    teacher = None
    if method not in ("vanilla", "sh-kd"):
        if teacher_path is None:
            log(f"training the default teacher ({teacher_model}, {teacher_epochs:g} epochs; cached for later runs)")
            teacher_path = default_teacher(t_cfg, dataset)
        teacher = load_bundle(teacher_path)
    log(f"distilling {cfg.model} with {method}: " + ", ".join(f"{k}={v:g}" for k, v in weights.__dict__.items() if v))
    if method == "sh-kd":
        init = load_bundle(teacher_path) if teacher_path else None
        student_path = run_sh_kd(cfg, t_cfg, weights, dataset, out, teacher_init=init)
        teacher_path = out / "sh_kd" / "i1" / "teacher.safetensors"
    else:
        student_path = distill_student(cfg, weights, dataset, teacher, out / "student", resume=resume, method=method)
    if student_path is None:
        raise EdgekdError(f"stopped early (--stop-after); rerun with --resume --out {out} to continue")
    report = {
        "method": method,
        "weights": weights.__dict__,
        "student": str(student_path),
        "teacher": str(teacher_path) if teacher_path else None,
        "config": cfg.to_dict(),
    }
    if evaluate:
        named = {"teacher": Path(teacher_path)} if teacher_path else {}
        named["student"] = student_path
        report["results"] = evaluate_pair(named, cfg, dataset, pairs)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json(out / "results.json", report)
    return report


def results_table(report: dict) -> str:
    """The comparison table ``edgekd distill`` prints."""
    rows = report.get("results", [])
    if not rows:
        return ""
    columns = [("role", "role"), ("model", "model"), ("params", "params")]
    columns += [(k, k) for k in rows[0] if k not in ("role", "model", "params")]
    return format_table(rows, columns)
