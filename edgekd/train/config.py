"""``TrainConfig``: every setting of one training run, saved inside its checkpoints and the run's settings.json.

Its defaults are the face-recognition standard a run on real data gets (arcface_torch: ArcFace s = 64, m = 0.5,
SGD 0.1 with momentum 0.9, polynomial decay, gradient clip 5, 20 epochs at batch 128); the demo's small values are
``edgekd.cli.options.DEMO`` and apply to the demo only. ``edgekd.cli.options`` layers config files and the command
line over them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Fields that change where or how fast a run trains, not what it trains: a resumed run may change them (the CLI's
# resumable settings), and the cache of default teachers and vanilla students does not key on them.
RUNTIME_SETTINGS = frozenset(
    {
        "device", "num_workers", "compile", "loss_backend", "teacher_cache", "checkpoint_every", "keep_checkpoints",
        "log_every", "stop_after",
    }
)  # fmt: skip


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
    lr_power: float = 1.0
    clip_grad: float = 5.0
    seed: int = 0
    compile: bool = True
    loss_backend: str = "auto"
    device: str = "auto"
    num_workers: int = 0
    flip: bool = True
    teacher_cache: bool = True
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    stop_after: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def training_settings(self) -> dict:
        """The fields that decide what the run trains: ``to_dict`` without ``RUNTIME_SETTINGS``."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_SETTINGS}
