"""User-facing errors: one line naming the problem and what to do; the CLI prints them and exits 2."""


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
