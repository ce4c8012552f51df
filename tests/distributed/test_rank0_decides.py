"""Under torchrun, what the run folder holds is decided by rank 0 and checked to be visible to every rank.

Ranks on other nodes can see another state of a folder (NFS attribute caches) or none of it (node-local disks). If
each rank decided on its own view whether to resume, or from which checkpoint, the ranks would enter the load and
save collectives unevenly and wait for each other until the 60-minute timeout. Two gloo ranks (spawned, CPU) stand
for two nodes; rank 1's view of the file system is changed by patching what it reads:

- rank 1 sees no checkpoint where rank 0 sees one (a stale view): the run resumes from rank 0's on both ranks;
- rank 1 cannot see the checkpoint folder, or the teacher cache, at all: every rank stops with the same one-line
  error naming the rank and the path, instead of hanging.
"""

from __future__ import annotations

import json
import os
import pathlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import edgekd.train.loop as loop
from edgekd.data.synthetic import SyntheticIdentities
from edgekd.distill.pipeline import build_trainee
from edgekd.distributed.launch import current_world
from edgekd.errors import EdgekdError
from edgekd.losses import LossWeights
from edgekd.train.config import TrainConfig
from edgekd.train.loop import fit
from edgekd.train.teacher_cache import build_teacher_cache

WORLD = 2
CFG = TrainConfig(
    model="mbf_tiny", head="arcface", scale=16.0, margin=0.3, batch_size=8, steps=4, lr=0.05, warmup_steps=0,
    compile=False, checkpoint_every=2, keep_checkpoints=5, log_every=1, device="cpu", seed=3, teacher_cache=False,
)  # fmt: skip
TIMEOUT_S = 240  # the checks take ~30 s on a loaded 2-core CPU; a hang is what the fix prevents


def _data() -> SyntheticIdentities:
    return SyntheticIdentities(identities=4, images_per_identity=4, image_size=32, seed=0)


def _blind_to(monkeypatch, folder: Path) -> None:
    """This rank's file system lacks ``folder`` (a node-local disk elsewhere)."""
    exists = pathlib.Path.exists
    monkeypatch.setattr(pathlib.Path, "exists", lambda p, **kw: not str(p).startswith(str(folder)) and exists(p, **kw))


def _fit(run_dir: Path, resume: bool = False, stop_after: int | None = None):
    from dataclasses import replace

    torch.manual_seed(0)
    student = build_trainee(CFG, _data())
    result = fit(
        student,
        replace(CFG, stop_after=stop_after),
        LossWeights(),
        _data(),
        run_dir,
        resume=resume,
        world=current_world(),
    )
    return result, torch.cat([p.detach().flatten() for p in student.backbone.parameters()])


def _checks(world, tmp: Path) -> dict:
    out = {}
    _, straight = _fit(tmp / "straight")
    _fit(tmp / "stale", stop_after=2)
    with pytest.MonkeyPatch.context() as monkeypatch:
        if world.rank == 1:  # a stale view: the checkpoint of step 2 is not there yet
            monkeypatch.setattr(loop, "latest_checkpoint", lambda run_dir: None)
        result, resumed = _fit(tmp / "stale", resume=True)
    out["resumed steps"] = result.steps
    # bit for bit, as the product claims: the same ranks, threads and shapes in these processes, state restored exactly
    out["resumed = uninterrupted"] = bool(torch.equal(resumed, straight))

    _fit(tmp / "blind", stop_after=2)
    with pytest.MonkeyPatch.context() as monkeypatch:
        if world.rank == 1:
            _blind_to(monkeypatch, tmp / "blind")
        try:
            _fit(tmp / "blind", resume=True)
        except EdgekdError as exc:
            out["blind checkpoint"] = str(exc)

    backbone = build_trainee(CFG, _data()).backbone.eval()
    cache = tmp / "cache"
    build_teacher_cache(backbone, _data(), backbone.cfg.mean, backbone.cfg.std, cache, "cpu", 8, world)
    with pytest.MonkeyPatch.context() as monkeypatch:
        if world.rank == 1:
            _blind_to(monkeypatch, cache)
        try:
            build_teacher_cache(backbone, _data(), backbone.cfg.mean, backbone.cfg.std, cache, "cpu", 8, world)
        except EdgekdError as exc:
            out["blind cache"] = str(exc)
    return out


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=WORLD)
    try:
        (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(_checks(current_world(), Path(tmp))))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # a 2-process spawn and four short runs: ~30 s on a loaded 2-core CPU
def test_rank_0_decides_what_the_run_folder_holds(tmp_path):
    context = mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn", join=False)
    deadline = TIMEOUT_S
    while not context.join(timeout=5):
        deadline -= 5
        if deadline <= 0:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish in {TIMEOUT_S} s: they wait for each other in a collective")
    for rank in range(WORLD):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["resumed steps"] == CFG.steps and out["resumed = uninterrupted"], out
        for key, folder in (("blind checkpoint", "blind"), ("blind cache", "cache")):
            assert out[key].startswith("rank 1 of 2 cannot see "), out[key]
            assert str(tmp_path / folder) in out[key] and "\n" not in out[key]
        assert "every node sees" in out["blind checkpoint"] and "EDGEKD_CACHE_DIR" in out["blind cache"]
