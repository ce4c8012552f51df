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

A cell (``cells.py``) is one training run plus its evaluation; it is skipped once its ``result.json`` exists and
continues from its last checkpoint when it was killed half-way. The gates are ``gates.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from edgekd.atomic import write_json
from edgekd.data import create_dataset
from edgekd.errors import DataError, EdgekdError
from edgekd.study.cells import Cell, CellRunner
from edgekd.study.gates import GateError, check_gates, check_sizes
from edgekd.study.grid import ROWS, SWEPT, Profile
from edgekd.study.report import write_report
from edgekd.utils.env import source_commit

__all__ = ["StudyRunner", "run_study", "planned_cells", "cache_dir", "check_data", "STUDY_FILE"]

STUDY_FILE = "study.json"


@contextlib.contextmanager
def cache_dir(path: Path) -> Iterator[None]:
    """Point ``EDGEKD_CACHE_DIR`` (teacher-embedding caches) into the study folder while the study runs (worker
    processes spawned meanwhile inherit it)."""
    old = os.environ.get("EDGEKD_CACHE_DIR")
    os.environ["EDGEKD_CACHE_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("EDGEKD_CACHE_DIR", None)
        else:
            os.environ["EDGEKD_CACHE_DIR"] = old


def planned_cells(profile: Profile) -> int:
    """Training runs of the whole study (teachers included), in ``StudyRunner.run``'s order."""
    sw = profile.sweeps
    grids = {"T": sw.T, "th_kd": sw.th_kd, "alpha": sw.alpha, "l2e": sw.l2e}
    first = 1 + sum(len(grids[p]) for p in SWEPT.values()) + (len(ROWS) - 1 - len(SWEPT)) + 1  # + sh-teacher
    return 1 + first + (profile.seeds - 1) * (len(ROWS) + 1) + int(profile.long_check)


class StudyRunner:
    """The study's order (module docstring): gate 1, the teacher and the seed-0 vanilla student, gates 2-3, the
    selection on validation, then every row on every seed."""

    def __init__(
        self,
        profile: Profile,
        out: Path,
        device: str = "auto",
        log: Callable[[str], None] = print,
        on_cell: Callable[[], None] = lambda: None,
    ) -> None:
        self.profile, self.out, self.log = profile, Path(out), log
        self.cells = CellRunner(profile, self.out, device, log, on_cell, total=planned_cells(profile))

    def size_gate(self) -> dict:
        """Gate 1 on the teacher and the student built untrained, the student at the teacher's width."""
        teacher = self.cells.fresh(self.profile.teacher, {})
        student = self.cells.fresh(self.profile.student, {"embed_dim": teacher.backbone.embed_dim})
        return check_sizes(self.profile.gates, teacher, student)

    def select(self, row: str, param: str, grid: tuple[float, ...], hp: dict[str, float]) -> float:
        """Train ``row`` on seed 0 for each ``param`` value in ``grid`` (others from ``hp``); the best on val."""
        scores = {}
        for value in grid:
            result = self.cells.student(Cell.student(row, 0, {**hp, param: value}))
            scores[value] = result["val"]["top1"]
        best = max(grid, key=lambda v: scores[v])  # the first listed on ties
        path = self.out / "selection.json"
        table = json.loads(path.read_text()) if path.is_file() else {}
        table[row] = {"param": param, "scores": {f"{v:g}": s for v, s in scores.items()}, "chosen": best, "at": hp}
        write_json(path, table)
        return best

    def run(self) -> None:
        sw, cells = self.profile.sweeps, self.cells
        sizes = self.size_gate()
        teacher = cells.teacher()
        vanilla = cells.student(Cell.student("vanilla", 0, {}))
        check_gates(self.profile.gates, sizes, teacher, vanilla, self.out, self.log)
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
                    cells.student(Cell.student("vanilla", seed, {}))
                    cells.sh_teacher(seed)
                cell = Cell.student(row, seed, hp)
                cells.student(cell)
                cells.test(cell)
        if self.profile.long_check:
            cells.long_vanilla()


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
    record = json.loads(path.read_text()) if path.is_file() else {"invocations": []}
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
        with cache_dir(out / "cache"):
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
    summary = {"cells": runner.cells.total, "trained": runner.cells.trained, "seconds": invocation["seconds"]}
    if report:
        summary["report"] = str(write_report(out))
    return summary
