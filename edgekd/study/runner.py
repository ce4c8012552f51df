"""Run the study cell by cell through the distill pipeline; every cell resumes, and so does the study.

Order (``StudyRunner.run``):

1. **capacity by size**: teacher and student are built (nothing trains) and the parameter ratio is checked;
2. the teacher (seed 0) and the seed-0 vanilla student train; **gates** (``Gates``): the teacher's validation
   top-1 must beat the vanilla student's by the profile's margin and the vanilla student's validation curve must
   be flat. ``gates.json`` records the numbers; a failed gate stops the study before any distilled student trains;
3. **selection** on the validation split, seed 0: T over ``kd``; then λ (``kd+th``), α (``th-kd/paper``) and β
   (``kd+l2e``) at that T; ``selection.json`` records every score and the choice;
4. every row at the chosen hyper-parameters on every seed (seed 0's chosen sweep cells are reused), each chosen
   cell evaluated once on the test split (``test.json``); SH-KD's student-aware teacher of seed k
   (``seed<k>/sh-teacher``) trains on seed k's vanilla student's head θ_s and serves both SH-KD forms.

Layout under ``out``::

    study.json                        the profile as data, and every invocation (command, start, wall time)
    gates.json, selection.json        step 2 and step 3
    cache/                            teacher-embedding caches (EDGEKD_CACHE_DIR points here; removed at the end)
    teacher/                          teacher.safetensors, metrics.jsonl, result.json, test.json
    seed<k>/sh-teacher/               the student-aware teacher (SH-KD stage I1) of seed k
    seed<k>/<row>/<hp label>/         student.safetensors (sh-kd: sh_kd/{i1,i2|i2_fresh}), result.json, test.json

A cell is one training run plus its evaluation on the validation split (and its per-epoch validation curve from
per-epoch checkpoints); it is skipped once its ``result.json`` exists. A cell killed half-way continues from its
last checkpoint; the checkpoints are deleted once the cell's result is written.
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
from edgekd.distill.pipeline import build_trainee, distill_student, run_sh_kd, train_teacher
from edgekd.errors import DataError, EdgekdError
from edgekd.eval.report import parameter_count
from edgekd.losses import LossWeights
from edgekd.study.evaluate import StudyData, evaluate_student, evaluate_teacher, val_curve
from edgekd.study.grid import (
    ROWS,
    SWEPT,
    Profile,
    Trainee,
    cell_folder,
    hp_label,
    paper_alpha,
    row_params,
    row_weights,
)
from edgekd.study.report import write_report
from edgekd.study.stats import flat_gain
from edgekd.train.config import TrainConfig
from edgekd.utils.env import source_commit
from edgekd.utils.hashing import json_digest

__all__ = ["Cell", "StudyRunner", "run_study", "GateError", "STUDY_FILE"]

STUDY_FILE = "study.json"


class GateError(EdgekdError):
    """A capacity or convergence gate failed: the study stops before any distilled student trains."""


@dataclass(frozen=True)
class Cell:
    """One training run: ``row`` is ``teacher``, ``sh-teacher`` (SH-KD stage I1 of ``seed``), ``vanilla-long`` (the
    convergence check) or a student row."""

    row: str
    seed: int
    hp: tuple[tuple[str, float], ...] = ()

    @classmethod
    def student(cls, row: str, seed: int, hp: dict[str, float]) -> Cell:
        return cls(row, seed, tuple((k, float(hp[k])) for k in row_params(row)))

    @property
    def params(self) -> dict[str, float]:
        return dict(self.hp)

    @property
    def is_teacher(self) -> bool:
        return self.row in ("teacher", "sh-teacher")

    @property
    def folder(self) -> Path:
        return cell_folder(self.row, self.seed, self.params)

    @property
    def name(self) -> str:
        label = f" [{hp_label(self.params)}]" if self.hp else ""
        return f"seed {self.seed} {self.row}{label}"

    def weights(self, kd: float) -> LossWeights:
        if self.is_teacher or self.row == "vanilla-long":
            return LossWeights(ce=1.0)
        return row_weights(self.row, self.params, kd)


# --------------------------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _link(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` (hard link, else an atomic copy)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except FileExistsError:
        pass
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


def weight_items(weights: dict) -> str:
    """``ce 1, kd 1, th_kd 1, T 4``: the non-zero terms, and the temperatures their KL terms use."""
    items = [f"{k} {weights[k]:g}" for k in ("ce", "kd", "th_ce", "th_kd", "l2e") if weights.get(k)]
    if weights.get("kd"):
        items.append(f"T {weights['T']:g}")
    if weights.get("th_kd") and (not weights.get("kd") or weights.get("T_th", weights["T"]) != weights["T"]):
        items.append(f"T_th {weights.get('T_th', weights['T']):g}")
    return ", ".join(items)


# --------------------------------------------------------------------------------------------- the runner


class StudyRunner:
    def __init__(
        self,
        profile: Profile,
        out: Path,
        device: str = "auto",
        log: Callable[[str], None] = print,
        on_cell: Callable[[], None] = lambda: None,
    ) -> None:
        self.profile, self.out, self.device, self.log, self.on_cell = profile, Path(out), device, log, on_cell
        self.data = StudyData(profile.data, profile.train_images, profile.eval_limit)
        self.trained = 0
        self.seen: set[Cell] = set()
        self.total = self.planned_cells()

    def planned_cells(self) -> int:
        """Training runs of the whole study (teachers included)."""
        sw = self.profile.sweeps
        grids = {"T": sw.T, "th_kd": sw.th_kd, "alpha": sw.alpha, "l2e": sw.l2e}
        first = 1 + sum(len(grids[p]) for p in SWEPT.values()) + (len(ROWS) - 1 - len(SWEPT)) + 1  # + sh-teacher
        return 1 + first + (self.profile.seeds - 1) * (len(ROWS) + 1) + int(self.profile.long_check)

    # configs ------------------------------------------------------------------------------------------------

    def config(self, who: Trainee, seed: int) -> TrainConfig:
        steps_per_epoch = len(self.data.train()) // who.batch_size
        return TrainConfig(
            model=who.model,
            model_kwargs=dict(who.model_kwargs),
            head="linear",
            data=self.profile.data,
            batch_size=who.batch_size,
            epochs=float(who.epochs),
            lr=who.lr,
            weight_decay=self.profile.weight_decay,
            warmup_steps=self.profile.warmup_steps,
            lr_power=self.profile.lr_power,
            seed=seed,
            compile=False,  # torch.compile costs 20-120 s per run on a CPU and bought no speed there
            device=self.device,
            checkpoint_every=steps_per_epoch,  # one checkpoint per epoch: the validation curve is read from them
            keep_checkpoints=who.epochs + 2,
            log_every=self.profile.log_every,
        )

    def student_config(self, seed: int) -> TrainConfig:
        """The students' settings at the teacher's embedding width (every row: equal widths and parameters)."""
        cfg = self.config(self.profile.student, seed)
        cfg.model_kwargs = {**cfg.model_kwargs, "embed_dim": self.teacher_width()}
        return cfg

    def teacher_width(self) -> int:
        t = self.profile.teacher
        return int(t.model_kwargs.get("embed_dim") or self._fresh(t, {}).backbone.embed_dim)

    def _fresh(self, who: Trainee, extra: dict):
        cfg = self.config(who, 0)
        cfg.model_kwargs = {**cfg.model_kwargs, **extra}
        return build_trainee(cfg, self.data.train())

    def cell_key(self, cell: Cell) -> str:
        """Hash of everything that decides this cell's numbers; a stored result with another key is not reused."""
        return json_digest(
            {
                "profile": self.profile.settings(),
                "row": cell.row,
                "seed": cell.seed,
                "weights": dataclasses.asdict(cell.weights(self.profile.sweeps.kd)),
            }
        )

    # cells ----------------------------------------------------------------------------------------------------

    def _start(self, cell: Cell) -> tuple[Path, dict | None, str]:
        folder = self.out / cell.folder
        key = self.cell_key(cell)
        again = cell in self.seen  # a cell asked for twice in one invocation (a chosen sweep cell, SH-KD's I0)
        self.seen.add(cell)
        prefix = f"[{len(self.seen):>{len(str(self.total))}}/{self.total}] {cell.name}"
        result_path = folder / "result.json"
        if result_path.is_file():
            result = _read_json(result_path)
            if result.get("key") != key:
                raise EdgekdError(f"{folder} holds a cell trained with other settings; use a new --out or delete it")
            if not again:
                self.log(f"{prefix}: done earlier, skipped")
            return folder, result, prefix
        marker = folder / "cell.json"
        if marker.is_file() and _read_json(marker).get("key") != key:
            raise EdgekdError(f"{folder} holds a run with other settings; use a new --out or delete it")
        write_json(marker, {"key": key})
        return folder, None, prefix

    def _finish(self, cell: Cell, folder: Path, result: dict, prefix: str, trained: float) -> dict:
        result.update(key=self.cell_key(cell), row=cell.row, seed=cell.seed, hp=cell.params)
        result["train_seconds"] = round(trained, 1)
        write_json(folder / "result.json", result)
        for stale in folder.rglob("checkpoints"):  # the final file is written; resume state is no longer needed
            shutil.rmtree(stale, ignore_errors=True)
        self.trained += 1
        self.on_cell()
        val = result["val"]
        extra = f", teacher head {100 * val['top1_th']:.2f}%" if "top1_th" in val else ""
        extra += f", p′ {100 * val['top1_pprime']:.2f}%" if "top1_pprime" in val else ""
        self.log(f"{prefix}: val top-1 {100 * val['top1']:.2f}%{extra}  ({trained:.0f} s)")
        return result

    def _steps_per_epoch(self, who: Trainee) -> int:
        return len(self.data.train()) // who.batch_size

    def teacher(self) -> dict:
        """The teacher (seed 0), trained once for every seed."""
        cell = Cell("teacher", 0)
        folder, result, prefix = self._start(cell)
        if result is not None:
            return result
        self.log(f"{prefix}: training {self.profile.teacher.model}")
        started = time.perf_counter()
        path = train_teacher(self.config(self.profile.teacher, 0), self.data.train(), folder, resume=True)
        return self._teacher_result(cell, folder, path, prefix, started)

    def sh_teacher(self, seed: int) -> dict:
        """SH-KD stage I1 of ``seed``: a teacher trained with seed ``seed``'s vanilla student head θ_s, frozen."""
        cell = Cell("sh-teacher", seed)
        folder, result, prefix = self._start(cell)
        if result is not None:
            return result
        theta_s = load_bundle(self.vanilla_file(seed)).head
        self.log(f"{prefix}: training {self.profile.teacher.model} on the frozen head θ_s of seed {seed}'s vanilla")
        started = time.perf_counter()
        cfg = self.config(self.profile.teacher, seed)
        path = train_teacher(cfg, self.data.train(), folder, student_head=theta_s, resume=True)
        return self._teacher_result(cell, folder, path, prefix, started)

    def _teacher_result(self, cell: Cell, folder: Path, path: Path | None, prefix: str, started: float) -> dict:
        if path is None:
            raise EdgekdError(f"training in {folder} stopped early; rerun the study to continue it")
        trained = time.perf_counter() - started
        bundle = load_bundle(path)
        val = self.data.eval_set("val")
        result = {
            "checkpoint": Path(path).name,
            "model": bundle.cfg.name,
            "params": parameter_count(bundle.backbone) + parameter_count(bundle.head),
            "val": evaluate_teacher(bundle, val, self.device),
            "val_curve": val_curve(folder, self._steps_per_epoch(self.profile.teacher), val, self.device),
            "test": evaluate_teacher(bundle, self.data.eval_set("test"), self.device),
            "epochs": self.profile.teacher.epochs,
        }
        return self._finish(cell, folder, result, prefix, trained)

    def teacher_file(self) -> Path:
        return self.out / "teacher" / "teacher.safetensors"

    def vanilla_file(self, seed: int) -> Path:
        return self.out / Cell.student("vanilla", seed, {}).folder / "student.safetensors"

    def student(self, cell: Cell) -> dict:
        """Train and validate a student cell unless its result.json exists; returns the result."""
        folder, result, prefix = self._start(cell)
        if result is not None:
            return result
        weights = cell.weights(self.profile.sweeps.kd)
        self.log(f"{prefix}: training ({weight_items(dataclasses.asdict(weights))})")
        cfg, dataset = self.student_config(cell.seed), self.data.train()
        started = time.perf_counter()
        if cell.row == "vanilla":
            path = distill_student(cfg, weights, dataset, None, folder, resume=True, method="vanilla")
            run_dir = folder
        elif cell.row.startswith("sh-kd/"):
            fresh = cell.row == "sh-kd/official"
            _link(
                self.out / Cell("sh-teacher", cell.seed).folder / "teacher.safetensors",
                folder / "sh_kd" / "i1" / "teacher.safetensors",
            )
            t_cfg = self.config(self.profile.teacher, cell.seed)
            path = run_sh_kd(
                cfg, t_cfg, weights, dataset, folder, fresh_head=fresh, temporary_student=self.vanilla_file(cell.seed)
            )
            run_dir = folder / "sh_kd" / ("i2_fresh" if fresh else "i2")
        else:
            teacher = load_bundle(self.teacher_file())
            path = distill_student(cfg, weights, dataset, teacher, folder, resume=True, method=cell.row)
            run_dir = folder
        if path is None:
            raise EdgekdError(f"training in {folder} stopped early; rerun the study to continue it")
        trained = time.perf_counter() - started
        bundle = load_bundle(path)
        head = self.teacher_head(cell)
        alpha = paper_alpha(dataclasses.asdict(weights)) if cell.row == "th-kd/paper" else None
        val = self.data.eval_set("val")
        result = {
            "checkpoint": str(Path(path).relative_to(folder)),
            "metrics": str((run_dir / "metrics.jsonl").relative_to(folder)),
            "weights": dataclasses.asdict(weights),
            "alpha": alpha,
            "model": bundle.cfg.name,
            "params": parameter_count(bundle.backbone) + parameter_count(bundle.head),
            "embed_dim": bundle.backbone.embed_dim,
            "epochs": self.profile.student.epochs,
            "val": evaluate_student(bundle, val, head, alpha, self.device),
            "val_curve": val_curve(run_dir, self._steps_per_epoch(self.profile.student), val, self.device),
        }
        return self._finish(cell, folder, result, prefix, trained)

    def long_vanilla(self) -> dict:
        """The seed-0 vanilla student trained for twice its epochs: what a longer schedule gains on validation."""
        cell = Cell("vanilla-long", 0)
        folder, result, prefix = self._start(cell)
        if result is not None:
            return result
        cfg = self.student_config(0)
        cfg.epochs *= 2
        cfg.keep_checkpoints = 2 * self.profile.student.epochs + 2
        self.log(f"{prefix}: training (ce 1) for {cfg.epochs:g} epochs, twice the students'")
        started = time.perf_counter()
        path = distill_student(cfg, LossWeights(ce=1.0), self.data.train(), None, folder, resume=True, method="vanilla")
        if path is None:
            raise EdgekdError(f"training in {folder} stopped early; rerun the study to continue it")
        trained = time.perf_counter() - started
        val = self.data.eval_set("val")
        result = {
            "checkpoint": Path(path).name,
            "epochs": int(cfg.epochs),
            "val": evaluate_teacher(load_bundle(path), val, self.device),
            "val_curve": val_curve(folder, self._steps_per_epoch(self.profile.student), val, self.device),
        }
        return self._finish(cell, folder, result, prefix, trained)

    def teacher_head(self, cell: Cell):
        """The frozen head a student's ``top1_th`` reads: the teacher's, or (SH-KD) its student-aware teacher's θ_s."""
        if cell.row.startswith("sh-kd/"):
            return load_bundle(self.out / Cell("sh-teacher", cell.seed).folder / "teacher.safetensors").head
        return load_bundle(self.teacher_file()).head

    def test(self, cell: Cell) -> None:
        """Evaluate a chosen student cell once on the test split (``test.json``)."""
        folder = self.out / cell.folder
        path = folder / "test.json"
        result = _read_json(folder / "result.json")
        if path.is_file() and _read_json(path).get("key") == result["key"]:
            return
        bundle = load_bundle(folder / result["checkpoint"])
        test = evaluate_student(
            bundle, self.data.eval_set("test"), self.teacher_head(cell), result["alpha"], self.device
        )
        write_json(path, {"key": result["key"], "test": test})

    # phases ----------------------------------------------------------------------------------------------------

    def check_sizes(self) -> dict:
        """Gate 1, before anything trains: teacher parameters ≥ ratio × the student's (at teacher width)."""
        gates = self.profile.gates
        teacher = self._fresh(self.profile.teacher, {})
        student = self._fresh(self.profile.student, {"embed_dim": teacher.backbone.embed_dim})
        count = lambda b: parameter_count(b.backbone) + parameter_count(b.head)  # noqa: E731
        t, s = count(teacher), count(student)
        info = {"teacher_params": t, "student_params": s, "ratio": t / s, "min_ratio": gates.min_param_ratio}
        if t < gates.min_param_ratio * s:
            raise GateError(
                f"capacity gap not met: the teacher has {t:,} parameters, {t / s:.1f}× the student's {s:,} "
                f"(at teacher width); the study needs ≥ {gates.min_param_ratio:g}×: use a larger teacher or a smaller "
                "student"
            )
        return info

    def check_gates(self, sizes: dict, teacher: dict, vanilla: dict) -> dict:
        """Gates 2-3, on validation, before any distilled student trains; writes ``gates.json``."""
        gates = self.profile.gates
        t_val, s_val = teacher["val"]["top1"], vanilla["val"]["top1"]
        gap = 100 * (t_val - s_val)
        gain, window = flat_gain(vanilla["val_curve"], gates.flat_fraction)
        info = {
            **sizes,
            "teacher_val_top1": t_val,
            "vanilla_val_top1": s_val,
            "gap_points": gap,
            "min_gap_points": gates.min_gap_points,
            "vanilla_flat_gain_points": 100 * gain,
            "flat_window_epochs": window,
            "max_flat_gain_points": gates.flat_max_gain_points,
        }
        write_json(self.out / "gates.json", info)
        self.log(
            f"gates: teacher {sizes['ratio']:.1f}× the student's parameters; val top-1 teacher {100 * t_val:.2f}% vs "
            f"vanilla {100 * s_val:.2f}% (gap {gap:.2f} points); vanilla gained {100 * gain:+.2f} points over its "
            f"last {window} epochs"
        )
        if gap < gates.min_gap_points:
            raise GateError(
                f"capacity gap not met: the teacher's validation top-1 {100 * t_val:.2f}% is only {gap:.2f} points "
                f"above the vanilla student's {100 * s_val:.2f}%; the study needs ≥ {gates.min_gap_points:g}: "
                "use a stronger teacher or a weaker student"
            )
        if not 100 * gain < gates.flat_max_gain_points:
            raise GateError(
                f"the vanilla student is not trained to a flat validation curve: it gained {100 * gain:.2f} points "
                f"over its last {window} epochs (the study needs < {gates.flat_max_gain_points:g}); train it longer"
            )
        return info

    def select(self, row: str, param: str, grid: tuple[float, ...], hp: dict[str, float]) -> float:
        """Train ``row`` on seed 0 for each ``param`` value in ``grid`` (others from ``hp``); the best on val."""
        scores = {}
        for value in grid:
            result = self.student(Cell.student(row, 0, {**hp, param: value}))
            scores[value] = result["val"]["top1"]
        best = max(grid, key=lambda v: scores[v])  # the first listed on ties
        path = self.out / "selection.json"
        table = _read_json(path) if path.is_file() else {}
        table[row] = {"param": param, "scores": {f"{v:g}": s for v, s in scores.items()}, "chosen": best, "at": hp}
        write_json(path, table)
        return best

    def run(self) -> None:
        sw = self.profile.sweeps
        sizes = self.check_sizes()
        teacher = self.teacher()
        vanilla = self.student(Cell.student("vanilla", 0, {}))
        self.check_gates(sizes, teacher, vanilla)
        hp: dict[str, float] = {}
        hp["T"] = self.select("kd", "T", sw.T, {})
        at_T = {"T": hp["T"]}
        hp["th_kd"] = self.select("kd+th", "th_kd", sw.th_kd, at_T)
        hp["alpha"] = self.select("th-kd/paper", "alpha", sw.alpha, at_T)
        hp["l2e"] = self.select("kd+l2e", "l2e", sw.l2e, at_T)
        self.log("chosen on validation (seed 0): " + ", ".join(f"{k} {v:g}" for k, v in hp.items()))
        for seed in range(self.profile.seeds):
            for row in ROWS:
                if row.startswith("sh-kd/"):
                    self.student(Cell.student("vanilla", seed, {}))
                    self.sh_teacher(seed)
                cell = Cell.student(row, seed, hp)
                self.student(cell)
                self.test(cell)
        if self.profile.long_check:
            self.long_vanilla()


def check_data(profile: Profile) -> None:
    """Fail before any training when Fashion-MNIST cannot be read."""
    try:
        create_dataset(profile.data, split="test")
    except DataError as exc:
        raise EdgekdError(
            f"Fashion-MNIST is not available ({str(exc).split(';')[0]}); run `apt-get install "
            "dataset-fashion-mnist` or pass --fmnist-root DIR"
        ) from None


def _study_record(profile: Profile, out: Path) -> dict:
    path = out / STUDY_FILE
    record = _read_json(path) if path.is_file() else {"invocations": []}
    if record.get("profile", profile.name) != profile.name:
        raise EdgekdError(
            f"{out} holds a {record['profile']!r} study; run the {profile.name!r} profile in another --out"
        )
    plan = dataclasses.asdict(profile)
    plan["seeds"] = max(profile.seeds, record.get("plan", {}).get("seeds", 0))
    record.update(profile=profile.name, plan=plan, version=2)
    return record


def run_study(
    profile: Profile,
    out: str | os.PathLike,
    command: str = "",
    device: str = "auto",
    log: Callable[[str], None] = print,
    report: bool = True,
) -> dict:
    """Run (or resume) the study under ``out``, then write ``REPRODUCTION.md`` and plots there.

    Returns:
        ``cells`` (planned training runs), ``trained`` (cells trained by this invocation), ``seconds`` and, with
        ``report``, ``report`` (the REPRODUCTION.md path).
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
        "commit": source_commit(),  # the code that trained this invocation's cells
    }
    record["invocations"].append(invocation)
    started = time.perf_counter()

    def save_record() -> None:  # after every cell, so an interrupted invocation keeps its time
        invocation["seconds"] = round(time.perf_counter() - started, 1)
        write_json(out / STUDY_FILE, record)

    save_record()
    runner = StudyRunner(profile, out, device, log, on_cell=save_record)
    try:
        with _cache_dir(out / "cache"):
            runner.run()
    except GateError as exc:
        invocation["gate_failed"] = str(exc)
        save_record()
        if report:
            write_report(out)
        raise
    invocation["finished"] = True
    save_record()
    shutil.rmtree(out / "cache", ignore_errors=True)  # teacher-embedding caches: every cell that reads them is done
    summary = {"cells": runner.total, "trained": runner.trained, "seconds": invocation["seconds"]}
    if report:
        summary["report"] = str(write_report(out))
    return summary
