"""Run study v3 (``confirmatory.py``) cell by cell in worker processes; every cell resumes, and so does the study.

Order: each arm's teacher first (one task per arm), then one task per (arm, seed), the face arm's longer chains
first: the seed's vanilla student and student-aware teacher where SH-KD needs them, then every row, each chosen
cell tested once. Cells are ``CellRunner``'s (``cells.py``): skipped once their ``result.json`` exists, continued
from their last checkpoint when killed. Tiny models train no faster on two threads than on one, so two workers with
one thread each do twice the work of one process on a 2-core machine.

Layout under ``out``: ``study.json`` (the plan and every invocation), ``cache/`` (teacher embeddings, removed at
the end) and one folder per arm laid out as study v2's (``teacher/``, ``seed<k>/<row>/<hp>/``).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from datetime import UTC, datetime
from pathlib import Path

from edgekd.atomic import write_json
from edgekd.errors import EdgekdError
from edgekd.study.cells import Cell, CellRunner
from edgekd.study.confirmatory import Arm, build_arms
from edgekd.study.confirmatory_report import write_confirmatory_report
from edgekd.study.runner import STUDY_FILE, cache_dir, check_data
from edgekd.utils.env import source_commit

__all__ = ["run_confirmatory", "arm_cells", "cell_count", "estimate_confirmatory_seconds"]

# Wall seconds of one cell on one thread of the 2-core development machine (AMD EPYC, two cells at once),
# measured before v3 with these settings: (teacher, student) per arm.
CELL_SECONDS = {"fmnist": (240.0, 65.0), "faces": (190.0, 45.0)}


def arm_cells(arm: Arm, seed: int) -> list[Cell]:
    """The cells of ``seed`` in their training order: SH-KD's vanilla student and student-aware teacher first."""
    cells = []
    if any(r.startswith("sh-kd/") for r in arm.rows):
        cells += [Cell.student("vanilla", seed, {}), Cell("sh-teacher", seed)]
    cells += [Cell.student(row, seed, arm.params) for row in arm.rows]
    return list(dict.fromkeys(cells))  # vanilla may be a row too


def cell_count(arms: tuple[Arm, ...]) -> int:
    """Training runs of the whole study, teachers included."""
    return sum(1 + sum(len(arm_cells(a, s)) for s in a.seeds) for a in arms)


def estimate_confirmatory_seconds(arms: tuple[Arm, ...], workers: int) -> float | None:
    """Wall seconds on the development machine with ``workers`` one-thread workers (None: not measured)."""
    if any(a.name not in CELL_SECONDS or a.profile.name.startswith(("v3q", "v3t")) for a in arms):
        return None
    total = 0.0
    for a in arms:
        teacher, student = CELL_SECONDS[a.name]
        for s in a.seeds:
            total += sum(teacher if c.is_teacher else student for c in arm_cells(a, s))
        total += teacher
    return total / max(1, min(workers, 2))


def _log(arm: Arm) -> Callable[[str], None]:
    return lambda line: print(f"{arm.name}: {line}", flush=True)


def _cell_runner(arm: Arm, out: Path, device: str) -> CellRunner:
    total = 1 + sum(len(arm_cells(arm, s)) for s in arm.seeds)
    return CellRunner(arm.profile, out / arm.name, device, _log(arm), on_cell=lambda: None, total=total)


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _train_teacher(profile_name: str, fmnist_root: str | None, arm_name: str, out: str, device: str) -> None:
    arm = _arm(profile_name, fmnist_root, arm_name)
    _cell_runner(arm, Path(out), device).teacher()


def _train_seed(profile_name: str, fmnist_root: str | None, arm_name: str, seed: int, out: str, device: str) -> None:
    """Every cell of one seed of one arm, each student cell tested once."""
    arm = _arm(profile_name, fmnist_root, arm_name)
    cells = _cell_runner(arm, Path(out), device)
    for cell in arm_cells(arm, seed):
        if cell.row == "sh-teacher":
            cells.sh_teacher(seed)
            continue
        cells.student(cell)
        cells.test(cell)


def _arm(profile_name: str, fmnist_root: str | None, arm_name: str) -> Arm:
    return next(a for a in build_arms(profile_name, fmnist_root) if a.name == arm_name)


def _record(profile_name: str, arms: tuple[Arm, ...], out: Path) -> dict:
    path = out / STUDY_FILE
    record = json.loads(path.read_text()) if path.is_file() else {"invocations": []}
    if record.get("profile", profile_name) != profile_name:
        raise EdgekdError(
            f"{out} holds a {record['profile']!r} study; run the {profile_name!r} profile in another --out"
        )
    plan = {a.name: {**dataclasses.asdict(a), "profile": dataclasses.asdict(a.profile), "hp": a.params} for a in arms}
    record.update(profile=profile_name, version=3, arms=plan)
    return record


def _run_pool(tasks: list[tuple], workers: int, threads: int) -> None:
    """Run ``(function, *args)`` tasks on ``workers`` spawned processes; the first failure stops the rest."""
    if workers == 1:
        _worker_init(threads)
        for fn, *args in tasks:
            fn(*args)
        return
    context = multiprocessing.get_context("spawn")  # no forked copies of torch's thread pools
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(threads,)) as pool:
        futures = [pool.submit(fn, *args) for fn, *args in tasks]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()


def run_confirmatory(
    profile_name: str,
    out: str | os.PathLike,
    command: str = "",
    device: str = "auto",
    workers: int = 2,
    threads: int = 1,
    fmnist_root: str | None = None,
    report: bool = True,
) -> dict:
    """Run (or resume) study v3's profile ``profile_name`` under ``out``, then write its REPRODUCTION.md there.

    Returns ``cells`` (planned training runs), ``seconds`` and, with ``report``, ``report`` (the file's path).
    """
    arms = build_arms(profile_name, fmnist_root)
    for arm in arms:
        if arm.name == "fmnist":
            check_data(arm.profile)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = _record(profile_name, arms, out)
    invocation = {
        "command": command,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": 0.0,
        "finished": False,
        "workers": workers,
        "threads": threads,
        "commit": source_commit(),
    }
    record["invocations"].append(invocation)
    write_json(out / STUDY_FILE, record)
    started = time.perf_counter()
    try:
        with cache_dir(out / "cache"):
            teachers = [(_train_teacher, profile_name, fmnist_root, a.name, str(out), device) for a in arms]
            _run_pool(teachers, min(workers, len(teachers)), threads)
            # The longest chains first, so that no long one starts last.
            by_length = sorted(arms, key=lambda a: -len(arm_cells(a, a.seeds[0])))
            seeds = [
                (_train_seed, profile_name, fmnist_root, a.name, s, str(out), device)
                for a in by_length
                for s in a.seeds
            ]
            _run_pool(seeds, workers, threads)
    finally:
        invocation["seconds"] = round(time.perf_counter() - started, 1)
        write_json(out / STUDY_FILE, record)
    invocation["finished"] = True
    write_json(out / STUDY_FILE, record)
    shutil.rmtree(out / "cache", ignore_errors=True)
    summary = {"cells": cell_count(arms), "seconds": invocation["seconds"]}
    if report:
        summary["report"] = str(write_confirmatory_report(out))
    return summary
