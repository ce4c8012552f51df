"""``--tensorboard``: the figures of metrics.jsonl as TensorBoard scalars, in ``<run>/tensorboard/``.

Rank 0 writes them (``torch.utils.tensorboard.SummaryWriter``) at the steps it writes metrics.jsonl lines: every
number of a step's line under ``train/`` (``train/loss``, each term, ``train/lr``, ``train/images_per_s``, and
``train/loss_scale`` under fp16), and each verification score of ``--eval-every`` under ``verify/`` (the pair sets
by name and ``verify/mean``). TensorBoard stores them as float32.

A resumed run's writer starts a new event file that purges what the files before it hold after the checkpoint it
resumes from (``purge_step``): steps whose work was lost are shown once, as metrics.jsonl keeps them once.

``torch.utils.tensorboard`` needs the ``tensorboard`` package, edgekd's ``tensorboard`` extra; ``require_tensorboard``
checks for it when the settings are made, before any training.
"""

from __future__ import annotations

from pathlib import Path

from edgekd.errors import MissingDependency

TENSORBOARD_DIR = "tensorboard"


def summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; without the tensorboard package a one-line MissingDependency."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingDependency(
            "--tensorboard needs the tensorboard package, which is not installed; pip install 'edgekd[tensorboard]'"
        ) from None
    return SummaryWriter


def require_tensorboard() -> None:
    """Fail now, in one line, where ``--tensorboard`` could not write its files."""
    summary_writer_class()


class TensorBoardLog:
    """The event files of one ``fit`` in ``run_dir/tensorboard``, continuing after step ``start``."""

    def __init__(self, run_dir: Path, start: int) -> None:
        self.writer = summary_writer_class()(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=start + 1)

    def step(self, line: dict) -> None:
        """A metrics.jsonl step line's numbers, as ``train/<key>`` at its step."""
        for key, value in line.items():
            if key not in ("step", "time"):
                self.writer.add_scalar(f"train/{key}", value, line["step"])
        self.writer.flush()  # on disk as the metrics.jsonl line is: a killed run's files hold what its log holds

    def verification(self, step: int, scores: dict[str, float]) -> None:
        """Verification scores (``{set name: accuracy, "mean": mean}``) as ``verify/<name>`` at ``step``."""
        for name, value in scores.items():
            self.writer.add_scalar(f"verify/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
