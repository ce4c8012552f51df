"""What ``fit`` trains: the ``Trainer`` interface, and ``LocalTrainee``, its one-process form.

``fit`` (``edgekd.train.loop``) drives the steps, checkpoints and logs; a ``Trainer`` owns how the model is laid out
over the processes of its world and what that changes: the (compiled) step function, the loss and stop flags as one
process would see them, the gradient clip, checkpoints, and the final model. ``LocalTrainee`` is the trainee's own
modules in one process; ``ShardedTrainee`` (``edgekd.train.sharded``) the torchrun form, a data-parallel backbone and
class-sharded heads. Both satisfy ``Trainer`` (tests/train/test_trainer.py checks their signatures against it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from edgekd.bundle import Bundle
from edgekd.heads.class_sampling import ClassSampler
from edgekd.losses import LossWeights, resolve_backend
from edgekd.losses.shared_head import head_loss_fn
from edgekd.train.checkpoint import load_checkpoint, save_checkpoint
from edgekd.train.teacher import Teacher


class Trainer(Protocol):
    """The model as one run trains it; every method is called on every process of the run's world."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer steps (on this process)."""
        ...

    def step_fn(self, weights: LossWeights, backend: str, sampler: ClassSampler | None = None):
        """``step(x, labels, z_t, step) -> (total, terms)`` on this process's rows, compiled where the run compiles;
        the head terms over the classes ``sampler`` draws for the step (Partial FC), or every class."""
        ...

    def reduce(
        self, terms: dict, total: torch.Tensor, weights: LossWeights
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's loss and terms as one process would log them, detached and still on the device."""
        ...

    def agree(self, stop: bool) -> bool:
        """Whether the run stops after this step: every process gets the same answer."""
        ...

    def clip(self, max_norm: float) -> None:
        """Clip every gradient by the norm of all of them together."""
        ...

    def images_per_step(self, local: int) -> int:
        """The step's images over all processes, from this process's ``local``."""
        ...

    def save(self, run_dir: Path, step: int, optimizer, extra: dict, keep: int) -> Path:
        """Write the checkpoint of ``step`` (all processes take part) and return its folder."""
        ...

    def load(self, path: Path, optimizer) -> dict:
        """Restore a checkpoint; returns its state (``step`` among it)."""
        ...

    def finish(self) -> None:
        """After the last step: make the trainee the model to write (rank 0's holds the whole of it)."""
        ...

    def close(self) -> None:
        """Give the trainee back what the trainer changed while it trained."""
        ...


def make_loss_fn(trainee: Bundle, teacher: Teacher | None, weights: LossWeights, backend: str):
    """``loss_fn(x, labels, z_t, rows=None) -> (total, terms)`` over the trainee's modules; this is what gets
    compiled (``rows``: the head rows a Partial FC step computes)."""
    backbone = trainee.backbone
    backend = resolve_backend(backend, next(backbone.parameters()).device)
    head_loss = head_loss_fn(trainee.head, teacher.head if teacher is not None else None, weights, backend)

    def loss_fn(x: torch.Tensor, labels: torch.Tensor, z_t: torch.Tensor | None, rows: torch.Tensor | None = None):
        return head_loss(backbone(x), labels, z_t, rows)

    return loss_fn


def head_classes(trainee: Bundle, teacher: Teacher | None) -> int:
    """C: the classes of the heads the loss reads (the student's, or the teacher's where the student has none)."""
    head = trainee.head if trainee.head is not None else teacher.head
    return head.num_classes


class LocalTrainee:
    """What ``fit`` trains in one process: the trainee's own modules (``ShardedTrainee`` is the torchrun form)."""

    def __init__(self, trainee: Bundle, teacher: Teacher | None, compile: bool) -> None:
        self.trainee, self.teacher, self.compile = trainee, teacher, compile

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in (self.trainee.backbone, self.trainee.head) if m is not None for p in m.parameters()]

    def step_fn(self, weights: LossWeights, backend: str, sampler: ClassSampler | None = None):
        """``step_fn(x, labels, z_t, step) -> (total, terms)``: the (compiled) ``loss_fn`` of ``make_loss_fn`` over
        the head rows ``sampler`` draws for the step (drawn outside the compiled graph: their count varies)."""
        loss_fn = make_loss_fn(self.trainee, self.teacher, weights, backend)
        loss_fn = torch.compile(loss_fn) if self.compile else loss_fn
        if sampler is None:
            return lambda x, labels, z_t, step: loss_fn(x, labels, z_t)
        num_classes = head_classes(self.trainee, self.teacher)
        return lambda x, labels, z_t, step: loss_fn(x, labels, z_t, sampler.compiled_rows(step, labels, 0, num_classes))

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
