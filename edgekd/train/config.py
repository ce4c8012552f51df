"""``TrainConfig``: every setting of one training run, saved inside its checkpoints and metrics.

Defaults < a YAML/TOML config file < command-line options; ``merge_config`` does that layering.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from edgekd.errors import EdgekdError


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
    batch_size: int = 64
    steps: int | None = None
    epochs: float = 1.0
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
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    stop_after: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise EdgekdError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
        if path.suffix == ".json":
            return json.loads(text)
    except Exception as exc:
        raise EdgekdError(f"cannot parse config file {path}: {str(exc).splitlines()[0]}") from None
    raise EdgekdError(f"config file {path} must end in .yaml, .yml, .toml or .json")


def merge_config(config_file: str | Path | None, overrides: dict, base: dict | None = None) -> dict:
    """Layer defaults (``base``), then the file, then the non-None ``overrides``; unknown keys are errors."""
    values = dict(base or {})
    if config_file:
        values.update(_read_file(Path(config_file)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return values


def build_config(values: dict, known: tuple[str, ...] = ()) -> TrainConfig:
    """A ``TrainConfig`` from ``values``, ignoring the command-level keys in ``known``."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - names - set(known))
    if unknown:
        raise EdgekdError(f"unknown config keys: {', '.join(unknown)}; valid keys are {', '.join(sorted(names))}")
    return TrainConfig(**{k: v for k, v in values.items() if k in names})
