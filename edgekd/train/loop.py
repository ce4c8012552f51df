"""``fit``: the training loop shared by teachers, students and every SH-KD stage.

One step: normalize + flip a batch, ask the ``Teacher`` for its embeddings (it reads its cache or runs its frozen
backbone), run the (compiled) loss function, check the loss is finite, clip, SGD step. Checkpoints every
``checkpoint_every`` steps make a killed run lose at most that much work; ``resume`` continues exactly.

Under torchrun (a process group of W > 1 ranks) the same loop trains a ``ShardedTrainee`` (``edgekd.train.sharded``):
each rank reads its rows of the same global batches, the backbone is data-parallel and the heads class-sharded, and
the run is the one-process run up to floating-point rounding. Rank 0 alone logs and writes run-level files.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edgekd.atomic import atomic_path
from edgekd.bundle import Bundle
from edgekd.data.transforms import normalize_and_flip
from edgekd.distributed.launch import World, current_world
from edgekd.errors import EdgekdError, TrainingDiverged, TrainingInterrupted
from edgekd.losses import LossWeights, resolve_backend
from edgekd.losses.shared_head import head_loss_fn
from edgekd.train.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    remove_run_debris,
    save_checkpoint,
)
from edgekd.train.config import TrainConfig
from edgekd.train.optim import build_optimizer, lr_factor, set_lr
from edgekd.train.order import OrderSampler, StepOrder
from edgekd.train.readback import Readback
from edgekd.train.sharded import ShardedTrainee
from edgekd.train.teacher import Teacher
from edgekd.utils.device import move_module, resolve_device
from edgekd.utils.progress import progress


@dataclass
class FitResult:
    steps: int
    total_steps: int
    last: dict
    stopped: bool


def total_steps_of(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Steps of the whole run: ``cfg.steps`` if set, else ``epochs`` worth of full batches."""
    return cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))


def make_loss_fn(trainee: Bundle, teacher: Teacher | None, weights: LossWeights, backend: str):
    """``loss_fn(x, labels, z_t) -> (total, terms)`` over the trainee's modules; this is what gets compiled."""
    backbone = trainee.backbone
    backend = resolve_backend(backend, next(backbone.parameters()).device)
    head_loss = head_loss_fn(trainee.head, teacher.head if teacher is not None else None, weights, backend)

    def loss_fn(x: torch.Tensor, labels: torch.Tensor, z_t: torch.Tensor | None):
        return head_loss(backbone(x), labels, z_t)

    return loss_fn


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


class LocalTrainee:
    """What ``fit`` trains in one process: the trainee's own modules (``ShardedTrainee`` is the torchrun form)."""

    def __init__(self, trainee: Bundle, teacher: Teacher | None, compile: bool) -> None:
        self.trainee, self.teacher, self.compile = trainee, teacher, compile

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in (self.trainee.backbone, self.trainee.head) if m is not None for p in m.parameters()]

    def step_fn(self, weights: LossWeights, backend: str):
        """The (compiled) ``loss_fn(x, labels, z_t) -> (total, terms)`` of ``make_loss_fn``."""
        loss_fn = make_loss_fn(self.trainee, self.teacher, weights, backend)
        return torch.compile(loss_fn) if self.compile else loss_fn

    def reduce(
        self, terms: dict, total: torch.Tensor, weights: LossWeights
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return total.detach(), {name: value.detach() for name, value in terms.items()}

    def agree(self, stop: bool) -> bool:
        return stop

    def clip(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.requires_grad], max_norm)

    def images_per_step(self, local: int) -> int:
        return local

    def save(self, run_dir: Path, step: int, optimizer, extra: dict, keep: int) -> Path:
        return save_checkpoint(run_dir, step, self.trainee, optimizer, extra, keep=keep)

    def load(self, path: Path, optimizer) -> dict:
        return load_checkpoint(path, self.trainee, optimizer)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


def _ensure_checkpoint(run_dir: Path, done: int, trainer, optimizer, cfg: TrainConfig, world: World) -> Path:
    """The checkpoint after ``done`` steps, written now unless the schedule already wrote it in this step.

    Rank 0 looks (``_latest_checkpoint``): every rank must enter the save's collectives or none."""
    path = checkpoint_path(run_dir, done)
    if _latest_checkpoint(run_dir, world) != path:
        trainer.save(run_dir, done, optimizer, {"config": cfg.to_dict()}, cfg.keep_checkpoints)
    return path


def _latest_checkpoint(run_dir: Path, world: World) -> Path | None:
    """``latest_checkpoint`` as rank 0 sees it, on every rank, and checked to be visible to every rank.

    Ranks on other nodes (NFS attribute caches, node-local folders) may see another state of the run folder; each
    deciding on its own view would send them into the save or load collectives unevenly, a hang until the timeout."""
    path = world.broadcast(latest_checkpoint(run_dir) if world.is_main else None)
    if path is not None:
        world.check_visible(path, "--out must be a folder every node sees (a shared filesystem)")
    return path


class _LossWatch:
    """The divergence check, one step late (``Readback``): a step's loss is read while the next step runs, and at
    once before a checkpoint is written, so no checkpoint ever holds the weights of a step whose loss was not finite.
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
) -> FitResult:
    """Train ``trainee`` (its parameters that require grad) on ``dataset`` with ``weights``; see module doc.

    ``teacher`` is what a student learns from (None: the labels alone); ``fit`` puts it on the device and asks it for
    ``z_t`` each step.

    SIGINT or SIGTERM during the run saves a checkpoint at the next step boundary and raises
    ``TrainingInterrupted`` (see ``StopSignals``).
    """
    with StopSignals() as signals:
        return _fit(trainee, cfg, weights, dataset, Path(run_dir), teacher, resume, desc, signals)


def _fit(
    trainee: Bundle,
    cfg: TrainConfig,
    weights: LossWeights,
    dataset,
    run_dir: Path,
    teacher: Teacher | None,
    resume: bool,
    desc: str,
    signals: StopSignals,
) -> FitResult:
    device = resolve_device(cfg.device)
    world = current_world()
    order = StepOrder(len(dataset), cfg.batch_size, cfg.seed, cfg.flip, world.rank, world.size)
    modules = [m for m in (trainee.backbone, trainee.head) if m is not None]
    for module in modules:
        move_module(module, device).train()
    if teacher is not None:
        teacher.to(device)
    if world.distributed:
        trainer = ShardedTrainee(trainee, teacher, world, device, compile="inductor" if cfg.compile else None)
    else:
        trainer = LocalTrainee(trainee, teacher, cfg.compile)
    with contextlib.closing(trainer):  # ShardedTrainee.close gives the trainee its own BatchNorm layers back
        total_steps = total_steps_of(cfg, order.steps_per_epoch)
        optimizer = build_optimizer(trainer.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)

        start = 0
        checkpoint = _latest_checkpoint(run_dir, world)
        if checkpoint is not None and not resume:
            raise EdgekdError(f"{run_dir} already holds checkpoints; pass --resume to continue or choose a new --out")
        if world.is_main:
            remove_run_debris(run_dir)  # what a killed earlier run left half-written; only this run uses the folder now
        world.barrier()
        if checkpoint is not None:
            start = trainer.load(checkpoint, optimizer)["step"]
            if world.is_main:
                _trim_metrics(run_dir / "metrics.jsonl", start)
        if start >= total_steps:
            trainer.finish()
            return FitResult(start, total_steps, {}, stopped=False)

        step_fn = trainer.step_fn(weights, cfg.loss_backend)
        mean, std = trainee.cfg.mean, trainee.cfg.std
        stop = total_steps if cfg.stop_after is None else min(total_steps, start + cfg.stop_after)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=OrderSampler(order, start, stop),
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
        )
        metrics_path = run_dir / "metrics.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        bar = progress(total=total_steps, initial=start, desc=desc, unit="step", disable=not world.is_main)
        last: dict = {}
        stopping = False
        watch = _LossWatch(run_dir, world)
        tic, seen = time.perf_counter(), 0
        for step, (images, labels) in enumerate(loader, start=start):
            indices, flips = order.batch(step)
            images = images.to(device, non_blocking=True)
            x = normalize_and_flip(images, mean, std, flips)
            labels = labels.to(device)
            z_t = teacher.embed(images, indices, flips) if teacher is not None else None
            lr = set_lr(optimizer, cfg.lr, lr_factor(step, total_steps, cfg.warmup_steps, cfg.lr_power))
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                total, terms = step_fn(x, labels, z_t)
            # One process: the loss as computed; ranks: the global batch's (l2e averaged), the same on every rank.
            # Both stay on the device: the host reads them a step later (_LossWatch) or when it logs.
            loss, terms = trainer.reduce(terms, total, weights)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if cfg.clip_grad > 0:
                trainer.clip(cfg.clip_grad)
            optimizer.step()
            watch.push(step, loss)
            seen += trainer.images_per_step(len(labels))
            done = step + 1
            if world.is_main and (done % cfg.log_every == 0 or done == stop):
                loss = float(loss)
                rate = seen / max(time.perf_counter() - tic, 1e-9)
                last = {
                    "step": done,
                    "loss": loss,
                    "lr": lr,
                    "images_per_s": round(rate, 1),
                    **{k: float(v) for k, v in terms.items()},
                }
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.4g}", img_s=f"{rate:.0f}")
                tic, seen = time.perf_counter(), 0
            bar.update(1)
            if done % cfg.checkpoint_every == 0 or done == stop:
                watch.check()  # this step's loss, before its weights are written
                trainer.save(run_dir, done, optimizer, {"config": cfg.to_dict()}, cfg.keep_checkpoints)
            stopping = trainer.agree(signals.received is not None)
            if stopping:
                break  # leaving the loop here also shuts the data loader's workers down
        bar.close()
        watch.check()
        if stopping:
            saved = _ensure_checkpoint(run_dir, done, trainer, optimizer, cfg, world)
            raise TrainingInterrupted(signals.received or signal.SIGTERM, done, saved)
        trainer.finish()
        return FitResult(stop, total_steps, last, stopped=stop < total_steps)
