"""One cell of the study: what it is (``Cell``: a row, a seed and the hyper-parameters its weights read) and how it
runs (``CellRunner``): one training run through the distill pipeline plus its evaluation on the validation split (and
its per-epoch validation curve from per-epoch checkpoints).

A cell is skipped once its ``result.json`` exists, and refused when that result was trained with other settings (its
``key``, the hash of everything that decides its numbers). A cell killed half-way continues from its last checkpoint
(``cell.json`` holds the key it started with); the checkpoints are deleted once the cell's result is written. A
chosen student cell is evaluated once on the test split (``test.json``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgekd.atomic import atomic_path, write_json
from edgekd.bundle import load_bundle
from edgekd.distill.pipeline import build_trainee, distill_student, run_sh_kd, train_teacher
from edgekd.errors import EdgekdError
from edgekd.eval.report import parameter_count
from edgekd.losses import LossWeights
from edgekd.study.evaluate import StudyData, evaluate_student, evaluate_teacher, val_curve, verify_pairs
from edgekd.study.grid import Profile, Trainee, cell_folder, hp_label, paper_alpha, row_params, row_weights
from edgekd.train.config import TrainConfig
from edgekd.utils.hashing import json_digest

__all__ = ["Cell", "CellRunner"]


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


class CellRunner:
    """Trains, validates and tests the study's cells under ``out``, numbering them ``[k/total]`` in the log;
    ``on_cell()`` runs after every cell trained."""

    def __init__(
        self,
        profile: Profile,
        out: Path,
        device: str,
        log: Callable[[str], None],
        on_cell: Callable[[], None],
        total: int,
    ) -> None:
        self.profile, self.out, self.device, self.log, self.on_cell = profile, out, device, log, on_cell
        self.data = StudyData(profile.data, profile.train_images, profile.eval_limit, profile.pairs)
        self.trained = 0
        self.seen: set[Cell] = set()
        self.total = total

    # configs ------------------------------------------------------------------------------------------------

    def config(self, who: Trainee, seed: int) -> TrainConfig:
        return TrainConfig(
            model=who.model,
            model_kwargs=dict(who.model_kwargs),
            head=self.profile.head,
            scale=self.profile.scale,
            margin=self.profile.margin,
            clip_grad=who.clip_grad,
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
            checkpoint_every=self._steps_per_epoch(
                who
            ),  # one checkpoint per epoch: the validation curve is read from them
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
        return int(t.model_kwargs.get("embed_dim") or self.fresh(t, {}).backbone.embed_dim)

    def fresh(self, who: Trainee, extra: dict):
        """``who`` built untrained (seed 0), its model settings updated by ``extra``."""
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

    def _curve(self, run_dir: Path, who: Trainee) -> list[float] | None:
        """The run's per-epoch validation top-1 (None when the profile reads no curves)."""
        if not self.profile.val_curves:
            return None
        return val_curve(run_dir, self._steps_per_epoch(who), self.data.eval_set("val"), self.device)

    def _verification(self, bundle) -> dict:
        """``verify``: verification on the profile's held-out pairs (none without ``pairs``)."""
        if self.data.pairs() is None:
            return {}
        return {"verify": verify_pairs(bundle, self.data.pairs(), self.device)}

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
            "backbone_params": parameter_count(bundle.backbone),
            "val": evaluate_teacher(bundle, val, self.device),
            "val_curve": self._curve(folder, self.profile.teacher),
            "test": evaluate_teacher(bundle, self.data.eval_set("test"), self.device),
            "epochs": self.profile.teacher.epochs,
            **self._verification(bundle),
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
        self.log(f"{prefix}: training ({weights.describe()})")
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
            "backbone_params": parameter_count(bundle.backbone),
            "embed_dim": bundle.backbone.embed_dim,
            "epochs": self.profile.student.epochs,
            "val": evaluate_student(bundle, val, head, alpha, self.device),
            "val_curve": self._curve(run_dir, self.profile.student),
            **self._verification(bundle),
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
