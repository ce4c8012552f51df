"""``TrainConfig``: every setting of one training run, saved inside its checkpoints and the run's settings.json.

Its defaults are the face-recognition standard a run on real data gets (arcface_torch: ArcFace s = 64, m = 0.5,
SGD 0.1 with momentum 0.9, polynomial decay, gradient clip 5, 20 epochs at batch 128); the demo's small values are
``edgekd.cli.options.DEMO`` and apply to the demo only. ``edgekd.cli.options`` layers config files and the command
line over them.

Every field is checked when a ``TrainConfig`` is made, by its rule in ``FIELD_RULES`` (the command line's types for
these settings are made from the same rules), and ``model_kwargs`` against the model's constructor: a bad value is a
one-line ``EdgekdError`` before any work starts, from the Python API as from the command line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from edgekd.errors import EdgekdError
from edgekd.models import check_model_kwargs
from edgekd.rules import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, Rule
from edgekd.train.precision import AMP_MODES
from edgekd.train.tensorboard_log import require_tensorboard

# Fields that change where or how fast a run trains, not what it trains: a resumed run may change them (the CLI's
# resumable settings), and the cache of default teachers and vanilla students does not key on them.
RUNTIME_SETTINGS = frozenset(
    {
        "device", "num_workers", "compile", "loss_backend", "teacher_cache", "checkpoint_every", "keep_checkpoints",
        "log_every", "stop_after", "eval_every",
        "tensorboard",
    }
)  # fmt: skip

# Fields added after cached teachers and students existed, with the value at which a run trains exactly what it trained
# before the field: at that value the field is left out of the cache key, so adding it did not make every cached model
# train again. A new field joins only if that value reproduces the earlier behaviour exactly.
SINCE_CACHES = {"sample_rate": 1.0, "warmup_epochs": None, "amp": "auto"}


@dataclass
class TrainConfig:
    """One training run (a teacher, a student, or one SH-KD stage)."""

    model: str = "mbf"
    model_kwargs: dict = field(default_factory=dict)
    head: str = "arcface"
    scale: float = 64.0
    margin: float | None = None
    data: str = "synthetic"
    image_size: int | None = None
    batch_size: int = 128
    steps: int | None = None
    epochs: float = 20.0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    # arcface_torch's warmup_epoch: the warm-up in epochs, made steps of the run's epochs when it starts (None:
    # warmup_steps decides).
    warmup_epochs: float | None = None
    lr_power: float = 1.0
    clip_grad: float = 5.0
    sample_rate: float = 1.0
    seed: int = 0
    # The backbone's autocast dtype (edgekd.train.precision): auto is bf16 on CUDA, float32 elsewhere.
    amp: str = "auto"
    compile: bool = True
    loss_backend: str = "auto"
    device: str = "auto"
    num_workers: int = 0
    flip: bool = True
    skip_bad: bool = False
    teacher_cache: bool = True
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    stop_after: int | None = None
    eval_every: int | None = None
    # The logged scalars also as TensorBoard events in <run>/tensorboard (edgekd.train.tensorboard_log).
    tensorboard: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            example = None if f.default in (None, dataclasses.MISSING) else f"{f.name}={f.default!r}"
            value = field_rule(f.name).check(f.name, getattr(self, f.name), where="TrainConfig: ", example=example)
            setattr(self, f.name, value)
        check_model_kwargs(self.model, self.model_kwargs)
        if self.amp not in AMP_MODES:
            raise EdgekdError(f"TrainConfig: amp is {self.amp!r}; give one of {', '.join(AMP_MODES)} (amp='auto')")
        if self.tensorboard:
            require_tensorboard()  # before any work: a run asked to log there fails at once without the package

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def training_settings(self) -> dict:
        """The fields that decide what the run trains: ``to_dict`` without ``RUNTIME_SETTINGS``."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_SETTINGS}

    def cache_settings(self) -> dict:
        """What the cache of trained models keys on: ``training_settings`` without the ``SINCE_CACHES`` fields at
        their earlier behaviour's value."""
        return {k: v for k, v in self.training_settings().items() if k not in SINCE_CACHES or v != SINCE_CACHES[k]}


def field_rule(name: str) -> Rule:
    """What field ``name`` accepts: its rule, with None allowed where None is the field's default (it means "the
    default": ``steps=None`` leaves the length to ``epochs``, ``margin=None`` takes the head's own)."""
    default = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)
    return dataclasses.replace(FIELD_RULES[name], optional=default is None)


# What each field accepts; ``field_rule`` adds None where it is the default.
FIELD_RULES = {
    "model": Rule(str),
    "model_kwargs": Rule(dict),
    "head": Rule(str),
    "scale": POSITIVE,
    "margin": Rule(float, low=0, high=math.pi / 2, high_open=True),
    "data": Rule(str),
    "image_size": Rule(int, low=8),
    "batch_size": POSITIVE_INT,
    "steps": POSITIVE_INT,
    "epochs": POSITIVE,
    "lr": POSITIVE,
    "momentum": Rule(float, low=0, high=1, high_open=True),
    "weight_decay": NON_NEGATIVE,
    "warmup_steps": NON_NEGATIVE_INT,
    "warmup_epochs": NON_NEGATIVE,
    "lr_power": POSITIVE,
    "clip_grad": NON_NEGATIVE,
    # Partial FC's share of the head's classes each step keeps (1: every class, the exact loss).
    "sample_rate": Rule(float, low=0, high=1, low_open=True),
    # The data order seeds a generator per epoch with seed * 1_000_003 + epoch, which must fit in 64 bits.
    "seed": Rule(int, low=0, high=2**32 - 1),
    "compile": Rule(bool),
    "loss_backend": Rule(str),
    "device": Rule(str),
    "num_workers": NON_NEGATIVE_INT,
    "flip": Rule(bool),
    "skip_bad": Rule(bool),
    "teacher_cache": Rule(bool),
    "checkpoint_every": POSITIVE_INT,
    "keep_checkpoints": POSITIVE_INT,
    "log_every": POSITIVE_INT,
    "stop_after": POSITIVE_INT,
    "eval_every": POSITIVE_INT,
    "amp": Rule(str),  # one of edgekd.train.precision.AMP_MODES, checked in __post_init__
    "tensorboard": Rule(bool),
}
