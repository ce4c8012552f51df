"""Options shared by ``edgekd teacher`` and ``edgekd distill``; every default is None so config files can fill in."""

from __future__ import annotations

import click

from edgekd.train.config import TrainConfig, build_config, merge_config

# (option, config key, type, help). Flags are added separately below.
_TRAIN_OPTIONS = [
    ("--model", "model", str, "backbone name (see `python -m edgekd.models`); e.g. mbf, r50, timm/resnet18"),
    ("--head", "head", click.Choice(["arcface", "cosface", "cosine", "linear"]), "head kind"),
    ("--scale", "scale", float, "scale s of normalized heads"),
    ("--margin", "margin", float, "margin m (ArcFace radians / CosFace cosine)"),
    ("--data", "data", str, "training data: synthetic[:k=v,...], fmnist, an image folder or a train.rec"),
    ("--image-size", "image_size", int, "input height = width (multiple of 16 for MobileFaceNet)"),
    ("--batch-size", "batch_size", int, "images per step"),
    ("--steps", "steps", int, "total training steps (overrides --epochs)"),
    ("--epochs", "epochs", float, "training length in epochs"),
    ("--lr", "lr", float, "peak SGD learning rate"),
    ("--weight-decay", "weight_decay", float, "SGD weight decay"),
    ("--warmup-steps", "warmup_steps", int, "linear warm-up steps before polynomial decay"),
    ("--clip-grad", "clip_grad", float, "gradient-norm clip (0: off)"),
    ("--seed", "seed", int, "seed of initialization, data order and flips"),
    ("--device", "device", str, "auto, cpu or cuda[:N]"),
    ("--workers", "num_workers", int, "data-loading worker processes"),
    ("--checkpoint-every", "checkpoint_every", int, "steps between checkpoints"),
    ("--stop-after", "stop_after", int, "stop this invocation after N steps (time-sliced jobs); --resume continues"),
]


def train_options(func):
    """Decorate a click command with the shared training options."""
    for flag, key, kind, help_text in reversed(_TRAIN_OPTIONS):
        func = click.option(flag, key, type=kind, default=None, help=help_text)(func)
    func = click.option(
        "--compile/--no-compile", "compile", default=None, help="torch.compile the training step (default on)"
    )(func)
    func = click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        default=None,
        help="YAML/TOML/JSON file of option values; command-line options override it",
    )(func)
    func = click.option("--resume", is_flag=True, help="continue from the newest checkpoint in --out")(func)
    return func


TRAIN_KEYS = tuple(key for _, key, _, _ in _TRAIN_OPTIONS) + ("compile",)


def split_config(kwargs: dict, base: dict, command_keys: tuple[str, ...]) -> tuple[TrainConfig, dict]:
    """Merge defaults, the config file and CLI values; return the TrainConfig and the command-level values."""
    config_file = kwargs.pop("config_file", None)
    values = merge_config(config_file, kwargs, base)
    command = {k: values.pop(k) for k in list(values) if k in command_keys}
    return build_config(values), command
