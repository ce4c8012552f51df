"""Run a study profile cell by cell through the distill pipeline; every cell resumes, and so does the study.

Layout under ``out``::

    study.json                          the profile as data, and every invocation (command, start, wall time)
    cache/teacher_outputs/              teacher-embedding caches (EDGEKD_CACHE_DIR points here; removed at the end)
    <dataset>/selection.json            validation scores of each row's variants and the one chosen
    <dataset>/seed<k>/teacher/          teacher.safetensors, metrics.jsonl, result.json, test.json
    <dataset>/seed<k>/<row>/<variant>/  student.safetensors (sh-kd: sh_kd/{i0,i1,i2}/), result.json, test.json

A cell is one training run plus its validation evaluation; it is skipped once its ``result.json`` exists (a cell
killed half-way continues from its last checkpoint, which is deleted once the cell is done). ``test.json`` holds
the single test-split evaluation of a row's chosen cell. Protocol per dataset: seed 0 trains every variant of a
row, the best validation score picks one, and seeds 1.. train only that one. Shared work: the teacher of a
(dataset, seed) serves all its rows; SH-KD stage I0 is the vanilla cell of the same seed (the same training run),
and the sweep variants of SH-KD share stages I0 and I1, so only I2 differs between them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from edgekd.atomic import atomic_path, write_json
from edgekd.bundle import load_bundle
from edgekd.data import create_dataset
from edgekd.distill.methods import method_weights
from edgekd.distill.pipeline import distill_student, run_sh_kd, train_teacher
from edgekd.errors import DataError, EdgekdError
from edgekd.eval.report import parameter_count
from edgekd.losses import LossWeights
from edgekd.study.evaluate import StudyData, evaluate
from edgekd.study.grid import DatasetPlan, Profile, Row, Trainee, Variant
from edgekd.study.report import write_report
from edgekd.train.config import TrainConfig
from edgekd.utils.hashing import json_digest

__all__ = ["Cell", "StudyRunner", "run_study"]

STUDY_FILE = "study.json"


@dataclass(frozen=True)
class Cell:
    """One training run of the grid: a row's variant on one dataset and seed."""

    plan: DatasetPlan
    row: Row
    variant: Variant
    seed: int

    @property
    def folder(self) -> Path:
        base = Path(self.plan.name) / f"seed{self.seed}"
        return base / "teacher" if self.row.is_teacher else base / self.row.key.replace("/", "_") / self.variant.label

    @property
    def name(self) -> str:
        tag = "" if len(self.row.variants) == 1 else f" [{self.variant.label}]"
        return f"{self.plan.name} seed {self.seed} {self.row.key}{tag}"

    def weights(self) -> LossWeights:
        if self.row.is_teacher:
            return LossWeights(ce=1.0)

        return method_weights(self.row.method, self.row.preset, self.plan.face, self.variant.overrides)

    def key(self) -> str:
        """Hash of everything that decides this cell's numbers; a stored result with another key is not reused."""
        plan = {k: v for k, v in dataclasses.asdict(self.plan).items() if k != "rows"}
        return json_digest(
            {
                "plan": plan,
                "weights": dataclasses.asdict(self.weights()),
                "seed": self.seed,
                "row": [self.row.method, self.row.preset],
            }
        )


# --------------------------------------------------------------------------------------------- the runner


def _link(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` (hard link, else an atomic copy)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


@contextlib.contextmanager
def _cache_dir(path: Path) -> Iterator[None]:
    """Point ``EDGEKD_CACHE_DIR`` (teacher-embedding caches) into the study folder while the study runs."""
    old = os.environ.get("EDGEKD_CACHE_DIR")
    os.environ["EDGEKD_CACHE_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("EDGEKD_CACHE_DIR", None)
        else:
            os.environ["EDGEKD_CACHE_DIR"] = old


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


class StudyRunner:
    def __init__(
        self,
        profile: Profile,
        out: Path,
        device: str,
        log: Callable[[str], None],
        on_cell: Callable[[], None] = lambda: None,
    ) -> None:
        self.profile, self.out, self.device, self.log, self.on_cell = profile, Path(out), device, log, on_cell
        self._data = {plan.name: StudyData(plan) for plan in profile.datasets}
        self.total = sum(
            sum(len(r.variants) for r in plan.rows) + (profile.seeds - 1) * len(plan.rows) for plan in profile.datasets
        )
        self.done = 0
        self.trained = 0

    # configs ------------------------------------------------------------------------------------------------

    def config(self, plan: DatasetPlan, who: Trainee, seed: int) -> TrainConfig:
        return TrainConfig(
            model=who.model,
            model_kwargs=dict(who.model_kwargs),
            head=plan.head,
            scale=plan.scale,
            margin=plan.margin,
            data=plan.data,
            image_size=plan.image_size,
            batch_size=who.batch_size,
            epochs=who.epochs,
            lr=who.lr,
            weight_decay=plan.weight_decay,
            warmup_steps=plan.warmup_steps,
            seed=seed,
            compile=self.profile.compile,
            device=self.device,
            keep_checkpoints=1,
            checkpoint_every=self.profile.checkpoint_every,
            log_every=self.profile.log_every,
        )

    def teacher_file(self, plan: DatasetPlan, seed: int) -> Path:
        return self.out / plan.name / f"seed{seed}" / "teacher" / "teacher.safetensors"

    # training -----------------------------------------------------------------------------------------------

    def _train(self, cell: Cell, folder: Path) -> tuple[Path, str]:
        """Train the cell's model (or find it trained); returns the checkpoint and its metrics.jsonl, relative."""
        plan, seed, row = cell.plan, cell.seed, cell.row
        dataset = self._data[plan.name].train()
        s_cfg, t_cfg = self.config(plan, plan.student, seed), self.config(plan, plan.teacher, seed)
        if row.is_teacher:
            path, run = train_teacher(t_cfg, dataset, folder, resume=True), folder
        elif row.method == "vanilla":
            path = distill_student(s_cfg, cell.weights(), dataset, None, folder, resume=True, method="vanilla")
            run = folder
        elif row.method == "sh-kd":
            self._share_sh_stages(cell, folder)
            path = run_sh_kd(s_cfg, t_cfg, cell.weights(), dataset, folder)
            run = folder / "sh_kd" / "i2"
        else:
            teacher = load_bundle(self.teacher_file(plan, seed))
            path = distill_student(s_cfg, cell.weights(), dataset, teacher, folder, resume=True, method=row.key)
            run = folder
        if path is None:  # only a stop_after run stops early, and the study sets none
            raise EdgekdError(f"training in {folder} stopped early; rerun the study to continue it")
        return Path(path).relative_to(folder), str((run / "metrics.jsonl").relative_to(folder))

    def _share_sh_stages(self, cell: Cell, folder: Path) -> None:
        """Reuse the vanilla cell as stage I0, or a sibling variant's finished I0 + I1 (they ignore the weights)."""
        stages = folder / "sh_kd"
        i0, i1 = stages / "i0" / "student.safetensors", stages / "i1" / "teacher.safetensors"
        if i1.is_file():
            return
        seed_dir = self.out / cell.plan.name / f"seed{cell.seed}"
        for variant in cell.row.variants:
            sibling = seed_dir / cell.row.key.replace("/", "_") / variant.label / "sh_kd"
            if sibling != stages and (sibling / "i1" / "teacher.safetensors").is_file():
                if not i0.is_file():
                    _link(sibling / "i0" / "student.safetensors", i0)
                _link(sibling / "i1" / "teacher.safetensors", i1)
                return
        vanilla = seed_dir / "vanilla" / "preset" / "student.safetensors"
        if not i0.is_file() and vanilla.is_file():
            _link(vanilla, i0)

    # cells ----------------------------------------------------------------------------------------------------

    def run_cell(self, cell: Cell) -> dict:
        """Train and validate ``cell`` unless its result.json exists; returns the result."""
        folder = self.out / cell.folder
        result_path = folder / "result.json"
        key = cell.key()
        self.done += 1
        prefix = f"[{self.done:>{len(str(self.total))}}/{self.total}] {cell.name}"
        if result_path.is_file():
            result = _read_json(result_path)
            if result.get("key") != key:
                raise EdgekdError(f"{folder} holds a cell trained with other settings; use a new --out or delete it")
            self.log(f"{prefix}: done earlier, skipped")
            return result
        marker = folder / "cell.json"
        if marker.is_file() and _read_json(marker).get("key") != key:
            raise EdgekdError(f"{folder} holds a run with other settings; use a new --out or delete it")
        write_json(marker, {"key": key})
        self.log(f"{prefix}: training ({', '.join(_weight_items(cell.weights()))})")
        started = time.perf_counter()
        checkpoint, metrics = self._train(cell, folder)
        trained = time.perf_counter() - started
        bundle = load_bundle(folder / checkpoint)
        val = evaluate(bundle, cell.plan, self._data[cell.plan.name].eval_set("val"), self.device)

        result = {
            "key": key,
            "dataset": cell.plan.name,
            "row": cell.row.key,
            "method": cell.row.method,
            "preset": cell.row.preset,
            "variant": cell.variant.label,
            "seed": cell.seed,
            "weights": dataclasses.asdict(cell.weights()),
            "model": bundle.cfg.name,
            "params": parameter_count(bundle.backbone),
            "checkpoint": str(checkpoint),
            "metrics": metrics,
            "train_images": len(self._data[cell.plan.name].train()),
            "batch_size": (cell.plan.teacher if cell.row.is_teacher else cell.plan.student).batch_size,
            "val": val,
            "train_seconds": round(trained, 1),
            "eval_seconds": round(time.perf_counter() - started - trained, 1),
        }
        write_json(result_path, result)
        for stale in folder.rglob("checkpoints"):  # the final file is written; resume state is no longer needed
            shutil.rmtree(stale, ignore_errors=True)
        self.trained += 1
        self.on_cell()
        metric = cell.plan.selection_metric
        label = "TAR@FAR=1e-3" if cell.plan.face else "top-1"
        self.log(f"{prefix}: val {label} {100 * val[metric]:.2f}%  ({trained:.0f} s)")
        return result

    def test_cell(self, cell: Cell) -> None:
        """Evaluate a chosen cell once on the test split (``test.json``; sh-kd also its student-aware teacher)."""
        folder = self.out / cell.folder
        path = folder / "test.json"
        if path.is_file():
            return
        result = _read_json(folder / "result.json")
        data = self._data[cell.plan.name].eval_set("test")
        started = time.perf_counter()
        out = {
            "key": result["key"],
            "test": evaluate(load_bundle(folder / result["checkpoint"]), cell.plan, data, self.device),
        }
        if cell.row.method == "sh-kd":
            teacher = load_bundle(folder / "sh_kd" / "i1" / "teacher.safetensors")
            out["student_aware_teacher"] = evaluate(teacher, cell.plan, data, self.device)
        out["seconds"] = round(time.perf_counter() - started, 1)
        write_json(path, out)
        self.on_cell()

    def select(self, plan: DatasetPlan, row: Row, results: dict[str, dict]) -> Variant:
        """The variant with the best validation score on the first seed (the first listed on ties)."""
        metric = plan.selection_metric
        scores = {label: r["val"][metric] for label, r in results.items()}
        best = max(row.variants, key=lambda v: scores[v.label])
        path = self.out / plan.name / "selection.json"
        table = _read_json(path) if path.is_file() else {}
        table[row.key] = {"metric": metric, "scores": scores, "chosen": best.label}
        write_json(path, table)
        return best

    def run_plan(self, plan: DatasetPlan) -> None:
        chosen: dict[str, Variant] = {}
        for seed in range(self.profile.seeds):
            for row in plan.rows:
                if seed == 0:
                    results = {v.label: self.run_cell(Cell(plan, row, v, 0)) for v in row.variants}
                    chosen[row.key] = self.select(plan, row, results)
                else:
                    self.run_cell(Cell(plan, row, chosen[row.key], seed))
                self.test_cell(Cell(plan, row, chosen[row.key], seed))


def _weight_items(weights: LossWeights) -> list[str]:
    items = [f"{name} {value:g}" for name, value in dataclasses.asdict(weights).items() if name != "T" and value]
    if weights.kd or weights.th_kd:
        items.append(f"T {weights.T:g}")
    return items


def check_data(profile: Profile) -> None:
    """Fail before any training when a dataset of the profile cannot be read."""
    for plan in profile.datasets:
        if plan.name != "fmnist":
            continue

        try:
            create_dataset(plan.data, split="test")
        except DataError as exc:
            raise EdgekdError(
                f"Fashion-MNIST is not available ({str(exc).split(';')[0]}); run `apt-get install "
                "dataset-fashion-mnist`, pass --fmnist-root DIR, or pass --datasets synthetic to skip it"
            ) from None


def _study_record(profile: Profile, out: Path) -> dict:
    path = out / STUDY_FILE
    record = _read_json(path) if path.is_file() else {"invocations": []}
    if record.get("profile", profile.name) != profile.name:
        raise EdgekdError(
            f"{out} holds a {record['profile']!r} study; run the {profile.name!r} profile in another --out"
        )
    known = {d["name"]: d for d in record.get("plan", {}).get("datasets", [])}
    plan = dataclasses.asdict(profile)
    # Keep datasets an earlier invocation ran and this one skips, so the report still covers them.
    names = [d["name"] for d in plan["datasets"]]
    plan["datasets"] = [*plan["datasets"], *(d for name, d in known.items() if name not in names)]
    plan["seeds"] = max(profile.seeds, record.get("plan", {}).get("seeds", 0))
    record.update(profile=profile.name, plan=plan)
    return record


def run_study(
    profile: Profile,
    out: str | os.PathLike,
    command: str = "",
    device: str = "auto",
    log: Callable[[str], None] = print,
    report: bool = True,
) -> dict:
    """Run (or resume) every cell of ``profile`` under ``out``, then write ``REPRODUCTION.md`` and plots there.

    Returns:
        ``cells`` (total), ``trained`` (cells trained by this invocation), ``seconds`` and, with ``report``,
        ``report`` (the REPRODUCTION.md path).
    """
    out = Path(out)
    check_data(profile)
    out.mkdir(parents=True, exist_ok=True)
    record = _study_record(profile, out)
    invocation = {
        "command": command,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": 0.0,
        "finished": False,
        "device": device,
    }
    record["invocations"].append(invocation)
    started = time.perf_counter()

    def save_record() -> None:  # after every cell, so an interrupted invocation keeps its time
        invocation["seconds"] = round(time.perf_counter() - started, 1)
        write_json(out / STUDY_FILE, record)

    save_record()
    runner = StudyRunner(profile, out, device, log, on_cell=save_record)
    with _cache_dir(out / "cache"):
        for plan in profile.datasets:
            runner.run_plan(plan)
    invocation["finished"] = True
    save_record()
    shutil.rmtree(out / "cache", ignore_errors=True)  # teacher-embedding caches: every cell that reads them is done
    summary = {"cells": runner.total, "trained": runner.trained, "seconds": invocation["seconds"]}
    if report:
        summary["report"] = str(write_report(out))
    return summary
