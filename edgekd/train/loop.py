"""``fit``: the training loop shared by teachers, students and every SH-KD stage.

One step: normalize + flip a batch, ask the ``Teacher`` for its embeddings (it reads its cache or runs its frozen
backbone), run the (compiled) loss function, check the loss is finite, clip, SGD step. Checkpoints every
``checkpoint_every`` steps make a killed run lose at most that much work; ``resume`` continues exactly.

Under torchrun (a process group of W > 1 ranks) the same loop trains a ``ShardedTrainee`` (``edgekd.train.sharded``):
each rank reads its rows of the same global batches, the backbone is data-parallel and the heads class-sharded, and
the run is the one-process run up to floating-point rounding. Rank 0 alone logs and writes run-level files.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from edgekd.atomic import atomic_path
from edgekd.bundle import Bundle
from edgekd.data.transforms import normalize_and_flip
from edgekd.distributed.launch import ONE_PROCESS, World
from edgekd.errors import EdgekdError, TrainingDiverged, TrainingInterrupted
from edgekd.heads.class_sampling import ClassSampler
from edgekd.losses import LossWeights
from edgekd.train.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    remove_run_debris,
)
from edgekd.train.config import TrainConfig
from edgekd.train.optim import build_optimizer, lr_factor, set_lr
from edgekd.train.order import OrderSampler, StepOrder
from edgekd.train.precision import autocast_dtype, loss_scaler, restore_scaler, scaler_state
from edgekd.train.readback import Readback
from edgekd.train.sharded import ShardedTrainee
from edgekd.train.teacher import Teacher
from edgekd.train.tensorboard_log import TensorBoardLog
from edgekd.train.trainer import LocalTrainee, Trainer
from edgekd.train.verification import VerifyDuringTraining
from edgekd.utils.device import move_module, resolve_device
from edgekd.utils.progress import LogLines, note, progress


@dataclass
class FitResult:
    steps: int
    total_steps: int
    last: dict
    stopped: bool


def total_steps_of(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Steps of the whole run: ``cfg.steps`` if set, else ``epochs`` worth of full batches."""
    return cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))


def warmup_steps_of(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Linear warm-up steps: ``warmup_epochs`` worth of full batches when set (arcface_torch's ``warmup_epoch``,
    rounded up as the run's length is), else ``cfg.warmup_steps``."""
    if cfg.warmup_epochs is None:
        return cfg.warmup_steps
    return math.ceil(cfg.warmup_epochs * steps_per_epoch)


def _trim_metrics(path: Path, step: int) -> None:
    # Lines logged after the checkpoint we resume from describe lost work: drop them so the log reads as one run.
    # A line cut short by a kill is dropped too; the rewrite is atomic, so a second kill cannot lose the log.
    if path.is_file():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))


def _ensure_checkpoint(run_dir: Path, done: int, trainer, optimizer, extra: dict, keep: int, world: World) -> Path:
    """The checkpoint after ``done`` steps, written now unless the schedule already wrote it in this step.

    Rank 0 looks (``_latest_checkpoint``): every rank must enter the save's collectives or none."""
    path = checkpoint_path(run_dir, done)
    if _latest_checkpoint(run_dir, world) != path:
        trainer.save(run_dir, done, optimizer, extra, keep)
    return path


def _latest_checkpoint(run_dir: Path, world: World) -> Path | None:
    """``latest_checkpoint`` as rank 0 sees it, on every rank, and checked to be visible to every rank.

    Ranks on other nodes (NFS attribute caches, node-local folders) may see another state of the run folder; each
    deciding on its own view would send them into the save or load collectives unevenly, a hang until the timeout."""
    path = world.decide(lambda: latest_checkpoint(run_dir))
    if path is not None:
        world.check_visible(path, "--out must be a folder every node sees (a shared filesystem)")
    return path


class _LossWatch:
    """The divergence check, one step late (``Readback``): a step's loss is read while the next step runs, and at
    once before a checkpoint is written, so no checkpoint ever holds the weights of a step whose loss was not finite.

    Under fp16 a step whose gradients overflow is skipped by the loss scaler (``edgekd.train.precision``): its loss
    is finite and the watch lets it pass; the weights and momentum are those of the step before. A loss that is not
    finite is a divergence in every precision: the forward that gave it has written its BatchNorm statistics.
    """

    def __init__(self, run_dir: Path, world: World) -> None:
        self.run_dir, self.world = run_dir, world
        self.pending: tuple[int, Readback] | None = None

    def push(self, step: int, loss: torch.Tensor) -> None:
        """Check the step before, then queue the read of ``step``'s loss."""
        self.check()
        self.pending = (step, Readback(loss))

    def check(self) -> None:
        """Raise ``TrainingDiverged`` if the pending loss is not finite; nothing is pending afterwards."""
        if self.pending is None:
            return
        (step, readback), self.pending = self.pending, None
        loss = readback.value()
        if not math.isfinite(loss):
            kept = _latest_checkpoint(self.run_dir, self.world)
            where = f"the last good checkpoint is {kept}" if kept else "no checkpoint was written yet"
            raise TrainingDiverged(f"loss became {loss} at step {step + 1}; {where}; lower --lr or check the data")


class StopSignals:
    """While active (a ``with`` block), SIGINT and SIGTERM ask the training loop to stop instead of killing it.

    The first signal is only recorded: the loop checkpoints at the next step boundary, where no optimizer step is
    half done, and raises ``TrainingInterrupted``. A second signal aborts at once (``KeyboardInterrupt``) for a
    user who will not wait. The previous handlers come back on exit. Python sets handlers only from the main
    thread; elsewhere nothing changes.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            # None: the old handler was not set from Python; the default action is the closest to it.
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _record(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum


def fit(
    trainee: Bundle,
    cfg: TrainConfig,
    weights: LossWeights,
    dataset,
    run_dir: str | Path,
    teacher: Teacher | None = None,
    resume: bool = False,
    desc: str = "train",
    world: World = ONE_PROCESS,
    verifier: VerifyDuringTraining | None = None,
) -> FitResult:
    """Train ``trainee`` (its parameters that require grad) on ``dataset`` with ``weights``; see module doc.

    ``teacher`` is what a student learns from (None: the labels alone); ``fit`` puts it on the device and asks it for
    ``z_t`` each step. ``world``: the processes that train together (``edgekd.distributed.start_world``); the default
    is this process alone.

    SIGINT or SIGTERM during the run saves a checkpoint at the next step boundary and raises
    ``TrainingInterrupted`` (see ``StopSignals``). ``verifier``: verification every ``cfg.eval_every`` steps on
    rank 0 (``VerifyDuringTraining``).
    """
    with StopSignals() as signals, _Training(trainee, cfg, weights, dataset, Path(run_dir), teacher, world) as run:
        run.verifier = verifier if world.is_main else None
        start = run.start_step(resume)
        if start >= run.total_steps:
            run.trainer.finish()
            return FitResult(start, run.total_steps, {}, stopped=False)
        return run.train(start, desc, signals)


class _Training:
    """One ``fit``: the trainee on its device in the ``Trainer`` of its world, the optimizer and the data order.

    A context manager: on exit ``ShardedTrainee.close`` gives the trainee its own BatchNorm layers back.
    """

    def __init__(self, trainee, cfg: TrainConfig, weights, dataset, run_dir: Path, teacher, world: World) -> None:
        self.trainee, self.cfg, self.weights, self.dataset = trainee, cfg, weights, dataset
        self.run_dir, self.teacher, self.world = run_dir, teacher, world
        self.device = resolve_device(cfg.device)
        self.order = StepOrder(len(dataset), cfg.batch_size, cfg.seed, cfg.flip, world.rank, world.size)
        for module in (m for m in (trainee.backbone, trainee.head) if m is not None):
            move_module(module, self.device).train()
        if teacher is not None:
            teacher.to(self.device)
        self.verifier: VerifyDuringTraining | None = None
        self.trainer: Trainer = (
            ShardedTrainee(trainee, teacher, world, self.device, compile="inductor" if cfg.compile else None)
            if world.distributed
            else LocalTrainee(trainee, teacher, cfg.compile)
        )
        self.total_steps = total_steps_of(cfg, self.order.steps_per_epoch)
        # The schedule reads cfg.warmup_steps: a warm-up in epochs becomes this run's steps here, and the checkpoints
        # record both.
        self.cfg = replace(cfg, warmup_steps=warmup_steps_of(cfg, self.order.steps_per_epoch))
        self.optimizer = build_optimizer(self.trainer.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
        self.amp_dtype = autocast_dtype(cfg.amp, self.device)
        self.scaler = loss_scaler(cfg.amp, self.device, world.group if world.distributed else None)

    def __enter__(self) -> _Training:
        return self

    def __exit__(self, *exc_info) -> None:
        self.trainer.close()

    def start_step(self, resume: bool) -> int:
        """The step to start from: the latest checkpoint's (loaded) with ``resume``, else 0 in a folder without any."""
        run_dir, world = self.run_dir, self.world
        checkpoint = _latest_checkpoint(run_dir, world)
        if checkpoint is not None and not resume:
            raise EdgekdError(f"{run_dir} already holds checkpoints; pass --resume to continue or choose a new --out")
        if world.is_main:
            remove_run_debris(run_dir)  # what a killed earlier run left half-written; only this run uses the folder now
        world.barrier()
        if checkpoint is None:
            if world.is_main:  # a run killed before its first checkpoint starts over: all it logged is lost work
                _trim_metrics(run_dir / "metrics.jsonl", 0)
            return 0
        state = self.trainer.load(checkpoint, self.optimizer)
        restore_scaler(self.scaler, state, checkpoint)
        start = state["step"]
        if world.is_main:
            _trim_metrics(run_dir / "metrics.jsonl", start)
        return start

    def train(self, start: int, desc: str, signals: StopSignals) -> FitResult:
        """Steps ``start`` to the end of the run (or ``cfg.stop_after`` of them), checkpointing on the way."""
        cfg, world, trainer = self.cfg, self.world, self.trainer
        sampler = ClassSampler(cfg.sample_rate, cfg.seed) if cfg.sample_rate < 1 else None
        step_fn = trainer.step_fn(self.weights, cfg.loss_backend, sampler)
        stop = self.total_steps if cfg.stop_after is None else min(self.total_steps, start + cfg.stop_after)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=OrderSampler(self.order, start, stop),
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        bar = progress(total=self.total_steps, initial=start, desc=desc, unit="step", disable=not world.is_main)
        board = TensorBoardLog(self.run_dir, start) if cfg.tensorboard and world.is_main else None
        log = _StepLog(self.run_dir / "metrics.jsonl", bar, world.is_main, self.scaler, board)
        watch = _LossWatch(self.run_dir, world)
        stopping = False
        if cfg.compile:
            note(bar, f"{desc}: compiling the training step (torch.compile); the first step takes a minute or more")
        try:
            for step, (images, labels) in enumerate(loader, start=start):
                loss, terms, lr = self._step(step_fn, step, images, labels)
                watch.push(step, loss)
                done = step + 1
                log.step(done, trainer.images_per_step(len(labels)), loss, lr, terms, final=done == stop,
                         every=cfg.log_every)  # fmt: skip
                if cfg.compile and step == start and isinstance(bar, LogLines):
                    bar.rate_from_here()  # the ETA from compiled steps, not from the one that compiled
                if done % cfg.checkpoint_every == 0 or done == stop:
                    watch.check()  # this step's loss, before its weights are written
                    trainer.save(self.run_dir, done, self.optimizer, self.checkpoint_extra(), cfg.keep_checkpoints)
                if self.verifier is not None and self.verifier.due(done):
                    scores = self.verifier(done, self.trainee)
                    log.verification(done, scores)
                    note(
                        bar,
                        f"{desc}: step {done} verification "
                        + ", ".join(f"{k} {100 * v:.2f}%" for k, v in scores.items()),
                    )
                stopping = trainer.agree(signals.received is not None)
                if stopping:
                    break  # leaving the loop here also shuts the data loader's workers down
        finally:
            log.close()
        bar.close()
        watch.check()
        if stopping:
            extra, keep = self.checkpoint_extra(), cfg.keep_checkpoints
            saved = _ensure_checkpoint(self.run_dir, done, trainer, self.optimizer, extra, keep, world)
            raise TrainingInterrupted(signals.received or signal.SIGTERM, done, saved)
        trainer.finish()
        return FitResult(stop, self.total_steps, log.last, stopped=stop < self.total_steps)

    def checkpoint_extra(self) -> dict:
        """What a checkpoint's state.json holds besides step and optimizer: the config, and fp16's loss scaler."""
        return {"config": self.cfg.to_dict(), **scaler_state(self.scaler)}

    def _step(self, step_fn, step: int, images: torch.Tensor, labels: torch.Tensor):
        """One optimizer step; ``(loss, terms, lr)`` with the loss and terms still on the device."""
        cfg, device, trainer, optimizer = self.cfg, self.device, self.trainer, self.optimizer
        indices, flips = self.order.batch(step)
        images = images.to(device, non_blocking=True)
        x = normalize_and_flip(images, self.trainee.cfg.mean, self.trainee.cfg.std, flips)
        labels = labels.to(device)
        z_t = self.teacher.embed(images, indices, flips) if self.teacher is not None else None
        lr = set_lr(optimizer, cfg.lr, lr_factor(step, self.total_steps, cfg.warmup_steps, cfg.lr_power))
        with torch.autocast(device.type, self.amp_dtype, enabled=self.amp_dtype is not None):
            total, terms = step_fn(x, labels, z_t, step)
        # One process: the loss as computed; ranks: the global batch's (l2e averaged), the same on every rank.
        # Both stay on the device: the host reads them a step later (_LossWatch) or when it logs.
        loss, terms = trainer.reduce(terms, total, self.weights)
        optimizer.zero_grad(set_to_none=True)
        # Under fp16 the backward of the scaled loss, unscaled before the clip, and a step skipped where a gradient
        # is not finite; in every other precision the scaler passes the calls through.
        scaler = self.scaler
        scaler.scale(total).backward()
        if cfg.clip_grad > 0:
            scaler.unscale_(optimizer)
            trainer.clip(cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        return loss, terms, lr


class _StepLog:
    """metrics.jsonl and the progress bar's figures, every ``every`` steps and at the last (rank 0 alone); the
    same numbers to TensorBoard where ``board`` is given (--tensorboard), the verification scores too.

    ``scaler``: the run's loss scaler; under fp16 each line holds its ``loss_scale`` after the step."""

    def __init__(
        self, path: Path, bar, active: bool, scaler: torch.amp.GradScaler, board: TensorBoardLog | None = None
    ) -> None:
        self.path, self.bar, self.active, self.scaler, self.board = path, bar, active, scaler, board
        self.last: dict = {}
        self.tic, self.seen = time.perf_counter(), 0

    def step(self, done: int, images: int, loss: torch.Tensor, lr: float, terms: dict, final: bool, every: int) -> None:
        """Count ``images``; log step ``done`` when it is a multiple of ``every`` or the run's ``final`` step."""
        self.seen += images
        if self.active and (done % every == 0 or final):
            loss = float(loss)
            rate = self.seen / max(time.perf_counter() - self.tic, 1e-9)
            # Wall-clock time (UTC) on every line: a run's record says when each step happened, across resumes.
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            self.last = {"step": done, "time": stamp, "loss": loss, "lr": lr, "images_per_s": round(rate, 1),
                         **{k: float(v) for k, v in terms.items()}}  # fmt: skip
            if self.scaler.is_enabled():
                self.last["loss_scale"] = self.scaler.get_scale()
            with open(self.path, "a") as f:
                f.write(json.dumps(self.last) + "\n")
            if self.board is not None:
                self.board.step(self.last)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.4g}", img_s=f"{rate:.0f}")
            self.tic, self.seen = time.perf_counter(), 0
        self.bar.update(1)

    def verification(self, step: int, scores: dict[str, float]) -> None:
        """The verification scores of ``step`` (metrics.jsonl has them from the verifier) to TensorBoard."""
        if self.board is not None:
            self.board.verification(step, scores)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
