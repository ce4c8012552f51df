"""Explicit mixed precision (``--amp``, ``--bf16``, ``--fp16``, ``--fp32``): bf16 and fp16 train on the CPU too, an
interrupted run resumes bit-identical in each (fp16's loss scaler included), fp16 skips the steps whose gradients
overflow without calling them a divergence, and the setting is saved with the run and refused if changed on --resume.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from edgekd.data.synthetic import SyntheticIdentities
from edgekd.distill.pipeline import build_trainee
from edgekd.distributed.launch import current_world
from edgekd.losses import LossWeights
from edgekd.train.checkpoint import latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from edgekd.train.config import TrainConfig
from edgekd.train.loop import fit
from edgekd.train.optim import build_optimizer
from edgekd.train.precision import SCALER_STATE, autocast_dtype, restore_scaler, scaler_state

CFG = TrainConfig(
    model="mbf_tiny", head="arcface", batch_size=16, steps=6, lr=0.05, warmup_steps=2, compile=False,
    checkpoint_every=3, log_every=1, device="cpu", seed=3,
)  # fmt: skip
CE = LossWeights(ce=1.0)
INITIAL_SCALE = 2.0**16  # torch.amp.GradScaler's default, arcface_torch's too
DATA = "synthetic:identities=8,images_per_identity=4,image_size=16"
CLI = ["teacher", "--data", DATA, "--model", "r_tiny", "--batch-size", "8", "--device", "cpu", "--no-compile"]


def _metrics(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("images_per_s", "time")} for line in lines]


def _parameters(bundle) -> dict[str, torch.Tensor]:
    return {f"{p}.{k}": v.detach().clone() for p, m in (("b", bundle.backbone), ("h", bundle.head))
            for k, v in m.named_parameters()}  # fmt: skip


def _state(bundle) -> dict[str, torch.Tensor]:
    return {f"{p}.{k}": v.clone() for p, m in (("b", bundle.backbone), ("h", bundle.head))
            for k, v in m.state_dict().items()}  # fmt: skip


def test_auto_is_bf16_on_cuda_and_float32_elsewhere():
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype("fp16", torch.device("cpu")) is torch.float16
    assert autocast_dtype("fp32", torch.device("cuda")) is None


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_interrupted_and_resumed_run_ends_bit_identical(tiny_faces, tmp_path, amp):
    """As tests/train/test_training.py's test of the same name, in bf16 and in fp16 on the CPU. fp16's first steps
    overflow at the initial scale and are skipped (the scale halves each time), so the resumed run continues
    exactly only with the scale and growth tracker it stopped with: the checkpoints hold them."""
    cfg = replace(CFG, amp=amp)
    full = build_trainee(cfg, tiny_faces)
    fit(full, cfg, CE, tiny_faces, tmp_path / "full")
    logged = _metrics(tmp_path / "full")
    assert all(math.isfinite(line["loss"]) for line in logged)

    fit(build_trainee(cfg, tiny_faces), replace(cfg, stop_after=4), CE, tiny_faces, tmp_path / "cut")
    saved = read_state(latest_checkpoint(tmp_path / "cut"))
    assert saved["config"]["amp"] == amp
    resumed = build_trainee(cfg, tiny_faces)
    torch.manual_seed(1234)  # resume must not depend on the global RNG state at start
    fit(resumed, cfg, CE, tiny_faces, tmp_path / "cut", resume=True)
    a, b = _state(full), _state(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert logged == _metrics(tmp_path / "cut")

    if amp == "fp16":
        # Step 4's checkpoint holds the scale logged after step 4; it is below the initial one (steps were skipped).
        assert saved[SCALER_STATE]["scale"] == logged[3]["loss_scale"] < INITIAL_SCALE
    else:
        assert SCALER_STATE not in saved and "loss_scale" not in logged[0]
    # The forward ran in reduced precision: the first loss (same weights, same batch) is not float32's.
    fp32 = fit(build_trainee(CFG, tiny_faces), replace(CFG, steps=1), CE, tiny_faces, tmp_path / "fp32")
    assert fp32.last["loss"] != logged[0]["loss"]
    assert fp32.last["loss"] == pytest.approx(logged[0]["loss"], rel=0.02)  # bf16 keeps 8 bits, fp16 11


def test_fp16_steps_whose_gradients_overflow_are_skipped_not_a_divergence(tiny_faces, tmp_path):
    """At the initial scale 2¹⁶ this model's first gradients overflow float16: each such step leaves every weight as
    it was and halves the scale (GradScaler's rule), the loss stays finite and the run goes on; once the scale fits,
    steps change the weights. Stepping with those gradients instead would write inf/NaN weights, and the next loss
    would stop the run as diverged."""
    cfg = replace(CFG, amp="fp16", steps=8, warmup_steps=0)
    trainee = build_trainee(cfg, tiny_faces)
    before = _parameters(trainee)
    result = fit(trainee, cfg, CE, tiny_faces, tmp_path)
    scales = [line["loss_scale"] for line in _metrics(tmp_path)]
    # A skipped step halves the scale; a step taken keeps it (it doubles only after 2000 taken in a row).
    skipped = next(i for i, s in enumerate(scales) if s != INITIAL_SCALE / 2 ** (i + 1))
    taken = [i for i in range(1, len(scales)) if scales[i] == scales[i - 1]]
    assert skipped >= 1 and taken and result.steps == 8

    # The skipped steps alone, from the same start: no weight moved.
    alone = build_trainee(cfg, tiny_faces)
    fit(alone, replace(cfg, stop_after=skipped), CE, tiny_faces, tmp_path / "skipped")
    assert all(torch.equal(before[k], v) for k, v in _parameters(alone).items())
    assert any(not torch.equal(before[k], v) for k, v in _parameters(trainee).items())
    assert all(torch.isfinite(v).all() for v in _parameters(trainee).values())


def test_loss_scaler_state_round_trips_through_a_checkpoint(tiny_faces, tmp_path):
    """A real GradScaler on the CPU, after an overflow (scale halved) and a good step (growth tracker 1), through
    save_checkpoint / load_checkpoint into a fresh scaler: the same state, and the same next scale decisions."""
    bundle = build_trainee(CFG, tiny_faces)
    params = [p for m in (bundle.backbone, bundle.head) for p in m.parameters()]
    optimizer = build_optimizer(params, 0.1, 0.9, 0.0)
    scaler = torch.amp.GradScaler("cpu", growth_interval=3)
    for gradient in (float("inf"), 1.0):
        optimizer.zero_grad()
        scaler.scale(sum(p.sum() for p in params) * gradient).backward()
        scaler.step(optimizer)
        scaler.update()
    assert scaler.get_scale() == INITIAL_SCALE / 2 and scaler.state_dict()["_growth_tracker"] == 1

    path = save_checkpoint(tmp_path, 2, bundle, optimizer, {"config": CFG.to_dict(), **scaler_state(scaler)})
    fresh, restored = torch.amp.GradScaler("cpu", growth_interval=3), build_trainee(CFG, tiny_faces)
    restored_params = [p for m in (restored.backbone, restored.head) for p in m.parameters()]
    state = load_checkpoint(path, restored, build_optimizer(restored_params, 0.1, 0.9, 0.0))
    restore_scaler(fresh, state, path)
    assert fresh.state_dict() == scaler.state_dict()
    # Two more good steps reach the growth interval in both: the scale doubles back to 2¹⁶ in both.
    for s in (scaler, fresh):
        for _ in range(2):
            optimizer.zero_grad()
            s.scale(sum(p.sum() for p in params)).backward()
            s.step(optimizer)
            s.update()
    assert fresh.get_scale() == scaler.get_scale() == INITIAL_SCALE
    # A disabled scaler (every precision but fp16) saves nothing and ignores what a checkpoint holds.
    off = torch.amp.GradScaler("cpu", enabled=False)
    assert scaler_state(off) == {}
    restore_scaler(off, state, path)


def test_the_precision_is_saved_with_the_run_and_refused_if_changed_on_resume(tmp_path, run_cli, one_line):
    out = tmp_path / "run"
    code, _, err = run_cli([*CLI, "--steps", "3", "--stop-after", "2", "--log-every", "1", "--bf16", "--out", str(out)])
    assert code in (0, None), err
    assert json.loads((out / "settings.json").read_text())["settings"]["amp"] == "bf16"
    assert read_state(latest_checkpoint(out))["config"]["amp"] == "bf16"

    code, _, err = run_cli(["teacher", "--out", str(out), "--resume", "--fp16"])
    one_line(code, err, "--amp was 'bf16'", "is 'fp16' now")
    code, _, err = run_cli(["teacher", "--out", str(out), "--resume", "--amp", "bf16"])  # the same: allowed
    assert code in (0, None), err
    assert read_state(latest_checkpoint(out))["config"]["amp"] == "bf16"
    assert [line["step"] for line in _metrics(out)] == [1, 2, 3]


def test_a_precision_that_does_not_exist_is_a_one_line_error(tmp_path, run_cli, one_line):
    config = tmp_path / "run.yaml"
    config.write_text("amp: fp8\n")
    code, _, err = run_cli([*CLI, "--steps", "1", "--config", str(config), "--out", str(tmp_path / "a")])
    one_line(code, err, "amp", "fp8", "fp16")
    code, _, err = run_cli([*CLI, "--steps", "1", "--amp", "fp8", "--out", str(tmp_path / "b")])
    assert code == 2 and "fp8" in err and "Traceback" not in err  # click's own usage error
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _two_rank_fp16_runs(rank: int, tmp: str) -> None:
    """On each of 2 gloo ranks: a whole fp16 run, and the same run stopped after step 7 and resumed from its DCP
    checkpoint; each rank's tensors go to ``rank<r>.pt`` (rank 0 holds the gathered head, the others a placeholder)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    try:
        world, tmp = current_world(), Path(tmp)
        data = SyntheticIdentities(identities=8, images_per_identity=8, image_size=32, seed=0)
        cfg = replace(CFG, amp="fp16", steps=10)
        full = build_trainee(cfg, data, world=world)
        fit(full, cfg, CE, data, tmp / "full", world=world)
        fit(build_trainee(cfg, data, world=world), replace(cfg, stop_after=7), CE, data, tmp / "cut", world=world)
        resumed = build_trainee(cfg, data, world=world)
        fit(resumed, cfg, CE, data, tmp / "cut", resume=True, world=world)
        keep = (lambda k: True) if rank == 0 else (lambda k: k.startswith("b."))  # noqa: E731
        torch.save(
            {run: {k: v for k, v in _state(b).items() if keep(k)} for run, b in (("full", full), ("resumed", resumed))},
            tmp / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # a 2-process spawn: start-up dominates
def test_fp16_under_two_ranks_skips_alike_and_resumes_from_its_dcp_checkpoint_bit_identical(tmp_path):
    """The ranks' loss scalers sum their "not finite" flags (ShardedGradScaler), so both skip the same steps and
    their backbones stay equal; the scaler's state, written by rank 0 in the DCP checkpoint's state.json, brings the
    resumed run to the same weights and log as the whole one."""
    mp.start_processes(_two_rank_fp16_runs, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    full, resumed = ranks[0]["full"], ranks[0]["resumed"]
    assert full.keys() == resumed.keys() and any(k.startswith("h.") for k in full)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    for key, value in ranks[1]["full"].items():
        assert torch.equal(value, full[key]), key
    logged = _metrics(tmp_path / "full")
    assert logged == _metrics(tmp_path / "cut")
    scales = [line["loss_scale"] for line in logged]
    assert scales[0] < INITIAL_SCALE  # the first step was skipped
    assert any(scales[i] == scales[i - 1] for i in range(7, 10))  # the resumed part took a step: weights moved
    assert (tmp_path / "cut" / "checkpoints" / "step_0000010" / ".metadata").is_file()  # DCP wrote them
