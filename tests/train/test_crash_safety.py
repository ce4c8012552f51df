"""Crash safety of training runs: kill -9 at any moment, SIGTERM / Ctrl-C, output file modes, checkpoint removal.

The end-to-end tests run the real ``edgekd teacher`` command in a subprocess and compare the final teacher file
byte for byte with one uninterrupted run's.
"""

import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from edgekd import atomic
from edgekd.atomic import TEMP_FILE, TRASH, atomic_path, make_temp_dir
from edgekd.distill.pipeline import build_trainee
from edgekd.losses import LossWeights
from edgekd.train.checkpoint import (
    TEMP_CHECKPOINT,
    checkpoint_folders,
    latest_checkpoint,
    remove_run_debris,
    save_checkpoint,
)
from edgekd.train.config import TrainConfig
from edgekd.train.loop import fit
from edgekd.train.optim import build_optimizer
from edgekd.train.teacher_cache import STALE_TEMPORARY_S, build_teacher_cache

ARGS = [
    "teacher",
    "--data",
    "synthetic:identities=8,images_per_identity=4,image_size=16",
    "--model",
    "r_tiny",
    "--batch-size",
    "8",
    "--steps",
    "12",
    "--checkpoint-every",
    "2",
    "--device",
    "cpu",
    "--no-compile",
    "--workers",
    "0",
]
LAUNCH = "from edgekd.cli import main; main()"
# Test-only, inside the child process: checkpoint writes and old-checkpoint removals take 0.2 s longer, so that
# a kill can be aimed inside them. It changes timing only, not what is written.
SLOW_DISK = """
import shutil, time
import edgekd.train.checkpoint as checkpoint
_save_file, _rmtree = checkpoint.save_file, shutil.rmtree
def slow_save_file(*args, **kwargs):
    _save_file(*args, **kwargs)
    time.sleep(0.2)
def slow_rmtree(*args, **kwargs):
    time.sleep(0.2)
    _rmtree(*args, **kwargs)
checkpoint.save_file, shutil.rmtree = slow_save_file, slow_rmtree
"""
CFG = TrainConfig(model="r_tiny", batch_size=16, steps=2, compile=False, device="cpu", log_every=1)


def _env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.getbasetemp() / "edgekd-cache"
    return {**os.environ, "OMP_NUM_THREADS": "1", "EDGEKD_CACHE_DIR": str(cache)}


def _start(args: list[str], env: dict, slow_disk: bool = False, **popen) -> subprocess.Popen:
    code = SLOW_DISK + LAUNCH if slow_disk else LAUNCH
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def _run_to_end(args: list[str], env: dict, **popen) -> subprocess.CompletedProcess:
    proc = _start(args, env, **popen)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _wait_until(proc: subprocess.Popen, condition, timeout: float = 120.0) -> bool:
    """Poll ``condition`` while ``proc`` runs; True once it holds, False if the process ended or time ran out."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def _entries(folder: Path, pattern: re.Pattern) -> list[Path]:
    return [p for p in folder.iterdir() if pattern.fullmatch(p.name)] if folder.is_dir() else []


def _hidden(root: Path) -> list[Path]:
    """Every hidden file or folder under ``root``: edgekd's temporaries and trash are all hidden names."""
    return list(root.rglob(".*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run, under umask 022; returns its run folder."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _run_to_end([*ARGS, "--out", str(out)], _env(tmp_path_factory), umask=0o022)
    return out


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_ends_bit_identical_and_clean(reference, tmp_path, tmp_path_factory):
    env, out = _env(tmp_path_factory), tmp_path / "run"
    checkpoints = out / "checkpoints"
    args = [*ARGS, "--out", str(out)]
    rng = random.Random(7)

    def run_and_kill(resume: bool, condition, spread_s: float) -> bool:
        """Start a run, wait for ``condition``, SIGKILL it up to ``spread_s`` later; True if it was still running."""
        proc = _start(args + (["--resume"] if resume else []), env, slow_disk=True)
        reached = _wait_until(proc, condition)
        time.sleep(rng.uniform(0, spread_s))
        hit = reached and proc.poll() is None
        proc.kill()
        proc.communicate()
        return hit

    # During a checkpoint write, while its temporary folder exists.
    assert run_and_kill(False, lambda: bool(_entries(checkpoints, TEMP_CHECKPOINT)), 0.15)
    assert _hidden(out), "the kill should have left a temporary checkpoint folder"
    # During an old checkpoint's removal, while it is hidden as trash.
    assert run_and_kill(True, lambda: bool(_entries(checkpoints, TRASH)), 0.15)
    assert _hidden(out), "the kill should have left a trash folder"
    # At a random moment after the next checkpoint: training, writing, or the final file (or after the end).
    before = latest_checkpoint(out)
    run_and_kill(True, lambda: latest_checkpoint(out) not in (None, before), 0.6)

    _run_to_end([*args, "--resume"], env)
    # Bit for bit, as the product claims: every run here and the reference are processes of this machine with one
    # thread (_env), running the same kernels on the same shapes from state restored exactly.
    assert (out / "teacher.safetensors").read_bytes() == (reference / "teacher.safetensors").read_bytes()
    assert _hidden(out) == []


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_prints_the_resume_command_and_resume_is_bit_identical(
    signum, reference, tmp_path, tmp_path_factory
):
    env, out = _env(tmp_path_factory), tmp_path / "run"
    args = [*ARGS, "--out", str(out)]
    proc = _start(args, env, slow_disk=True)  # slow checkpoints: the run cannot finish before the signal lands
    assert _wait_until(proc, lambda: latest_checkpoint(out) is not None)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if "resume with:" in line]
    step = int(re.search(r"saved step (\d+)", line).group(1))
    assert latest_checkpoint(out).name == f"step_{step:07d}"
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command == ["edgekd", *args, "--resume"]

    _run_to_end(command[1:], env)
    # bit for bit: one thread, the same kernels on the same shapes, state restored exactly (as above)
    assert (out / "teacher.safetensors").read_bytes() == (reference / "teacher.safetensors").read_bytes()


def test_outputs_get_the_users_file_mode_under_umask_022(reference):
    paths = [reference, *reference.rglob("*")]
    assert reference / "teacher.safetensors" in paths and len(checkpoint_folders(reference)) == 2
    modes = {str(p.relative_to(reference.parent)): oct(p.stat().st_mode & 0o777) for p in paths}
    expected = {name: oct(0o755 if Path(reference.parent, name).is_dir() else 0o644) for name in modes}
    assert modes == expected


def test_atomic_files_and_temporary_folders_follow_the_umask(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_UMASK", 0o027)
    with atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"x")
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o640
    assert make_temp_dir(tmp_path, prefix=".x.").stat().st_mode & 0o777 == 0o750


def _trainee_and_optimizer(dataset):
    trainee = build_trainee(CFG, dataset)
    params = [p for m in (trainee.backbone, trainee.head) for p in m.parameters()]
    return trainee, build_optimizer(params, 0.1, 0.9, 0.0)


def test_an_old_checkpoint_is_never_seen_half_deleted(tiny_faces, tmp_path, monkeypatch):
    trainee, optimizer = _trainee_and_optimizer(tiny_faces)
    for step in (1, 2):
        save_checkpoint(tmp_path, step, trainee, optimizer, {}, keep=2)

    def dies_halfway(path, *args, **kwargs):
        # Deletes one file, then "the process is killed": the rest of the folder stays on disk.
        next(p for p in Path(path).iterdir() if p.is_file()).unlink()
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(shutil, "rmtree", dies_halfway)
        save_checkpoint(tmp_path, 3, trainee, optimizer, {}, keep=2)

    assert [p.name for p in checkpoint_folders(tmp_path)] == ["step_0000002", "step_0000003"]
    visible = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith("."))
    assert visible == ["step_0000002", "step_0000003"]
    [trash] = _entries(tmp_path / "checkpoints", TRASH)
    assert trash.name.startswith(".step_0000001.")
    remove_run_debris(tmp_path)
    assert _hidden(tmp_path) == []


def test_next_run_removes_only_edgekd_debris(tiny_faces, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    debris = [
        checkpoints / ".step_0000004.k2x_9abc",  # a checkpoint being written
        checkpoints / ".step_0000002.0123abcd.trash",  # an old checkpoint being removed
    ]
    for folder in debris:
        folder.mkdir(parents=True)
        (folder / "bundle.safetensors").write_bytes(b"half")
    debris.append(tmp_path / ".teacher.safetensors.ab_cd123.tmp")  # the final file being written
    debris[-1].write_bytes(b"half")
    kept = [tmp_path / "notes.tmp", tmp_path / ".notes", tmp_path / ".teacher.safetensors.tmp", checkpoints / "x"]
    for path in kept:
        path.write_text("mine")

    fit(build_trainee(CFG, tiny_faces), CFG, LossWeights(ce=1), tiny_faces, tmp_path)
    assert not any(p.exists() for p in debris)
    assert all(p.read_text() == "mine" for p in kept)


def test_teacher_cache_removes_only_stale_temporaries(tiny_faces, tmp_path):
    stale, fresh = tmp_path / ".teacher_0a1b.npy.abcd1234.tmp", tmp_path / ".teacher_0a1b.npy.efgh5678.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"half")
    long_ago = time.time() - STALE_TEMPORARY_S - 60
    os.utime(stale, (long_ago, long_ago))  # its writer was killed long ago; ``fresh`` may be a live writer's

    teacher = build_trainee(replace(CFG, seed=1), tiny_faces).backbone.eval()
    build_teacher_cache(teacher, tiny_faces, teacher.cfg.mean, teacher.cfg.std, tmp_path, torch.device("cpu"))
    assert _entries(tmp_path, TEMP_FILE) == [fresh]


def test_resume_drops_metrics_after_the_checkpoint_and_a_line_cut_short_by_a_kill(tmp_path):
    from edgekd.train.loop import _trim_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
    _trim_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
