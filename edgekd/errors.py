"""User-facing errors: one line naming the problem and what to do; the CLI prints them and exits 2."""

import signal
from pathlib import Path


class EdgekdError(ValueError):
    """A user error (bad input, missing file, unsupported option). Its message is one line."""


class DataError(EdgekdError):
    """A dataset, record, image or pair file that is missing, empty or corrupt."""


class CheckpointError(EdgekdError):
    """A checkpoint that is missing, corrupt, or does not fit the model it is loaded into."""


class TrainingDiverged(EdgekdError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class GateFailed(EdgekdError):
    """An exported artifact failed its parity or task gate; nothing final was written."""


class MissingDependency(EdgekdError):
    """An optional dependency (TensorRT, Triton, a dataset package) is not installed."""


class TrainingInterrupted(BaseException):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint; ``--resume`` continues from it.

    A ``BaseException`` like ``KeyboardInterrupt``: a stop the user asked for, not an error, so it must pass
    through ``except Exception`` handlers up to the command line, which prints how to resume.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name} after step {step}; checkpoint saved in {checkpoint}")


class EdgekdWarning(UserWarning):
    """Something the user should know that does not stop the run; the CLI prints it as ``edgekd: warning: ...``."""
