"""The one schema of the training commands' settings (``edgekd teacher``, ``edgekd distill``).

Each ``Setting`` names its click type and range, its help, its default and whether a resumed run may change it.
The same types check the command line and config files, so ``lr: 1e-3`` in YAML (a string to PyYAML) is a float
and ``batch_size: sixty`` is a one-line error. Defaults live in one place each: ``TrainConfig`` for training
settings (the face-standard values used on real data), ``Setting.default`` for command settings, and ``DEMO`` for
the built-in demo, which applies only when no ``--data`` is given.

``resolve_settings`` layers them: defaults < demo (no data given) < config file < command line; with ``--resume``
the run's saved ``settings.json`` replaces the defaults, and an option that would change the run's meaning is a
one-line error naming both values. Paths (``--data``, ``--teacher``, ``--pairs``, ``--out``, ...) are made absolute
against the working directory before anything else, so the saved run names its files from wherever it resumes.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import click

from edgekd.atomic import write_json
from edgekd.data import absolute_spec
from edgekd.errors import EdgekdError
from edgekd.heads import HEAD_KINDS, default_margin
from edgekd.models import require_model
from edgekd.train.config import TrainConfig
from edgekd.version import __version__

SETTINGS_FILE = "settings.json"

# The built-in default run (`make demo`): sized to finish within minutes on a 2-core CPU, teacher included.
# 200 synthetic identities at 32x32 keep MobileFaceNet's step cheap on a CPU. The scale is 16, not the face
# default 64: with C = 200 classes a fixed-scale head needs only s ≈ √2·ln(C − 1) ≈ 7.5 (AdaCos), and s = 64
# with m = 0.5 barely moves in a few hundred steps; the margin is lowered to 0.3 with it.
DEMO = {
    "data": "synthetic:identities=200,images_per_identity=16,image_size=32,pairs=2000,pair_identities=200",
    "scale": 16.0,
    "margin": 0.3,
    "batch_size": 64,
    "epochs": 3.0,
    "warmup_steps": 20,
    "checkpoint_every": 100,
    "teacher_model": "r18",
    "teacher_epochs": 3.0,
    "vanilla_baseline": True,
}


class DeviceType(click.ParamType):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

    name = "device"
    _pattern = re.compile(r"auto|cpu|cuda(:\d+)?")

    def convert(self, value, param, ctx):
        if isinstance(value, str) and self._pattern.fullmatch(value):
            return value
        self.fail(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N", param, ctx)


class ModelName(click.ParamType):
    """A registered model name or ``timm/<arch>``, checked before any work starts."""

    name = "model"

    def convert(self, value, param, ctx):
        try:
            require_model(value)
        except EdgekdError as exc:
            self.fail(str(exc), param, ctx)
        return value


class JSONObject(click.ParamType):
    """A JSON object on the command line (``'{"embed_dim": 256}'``) or a mapping in a config file."""

    name = "json"

    def convert(self, value, param, ctx):
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value)
        except (TypeError, ValueError):
            parsed = None
        if not isinstance(parsed, dict):
            self.fail(f"{value!r} is not a JSON object such as '{{\"embed_dim\": 256}}'", param, ctx)
        return parsed


def positive(kind: type) -> click.ParamType:
    return click.IntRange(min=1) if kind is int else click.FloatRange(min=0, min_open=True)


def non_negative(kind: type) -> click.ParamType:
    return click.IntRange(min=0) if kind is int else click.FloatRange(min=0)


@dataclass(frozen=True)
class Setting:
    """One option of a training command.

    Args:
        key: the config key (a ``TrainConfig`` field, or a command-level value).
        type: click type and range; checks the command line and config files alike.
        help: the option's help text.
        default: default on real data; None for a ``TrainConfig`` key means the dataclass default.
        resumable: a resumed run may change it (where or how fast it runs, not what it trains).
        saved: restored by ``--resume``; False for per-invocation values such as ``--stop-after``.
        flag: the option; default ``--key-with-dashes``. A ``--x/--no-x`` pair for booleans.
        shown_default: --help's text for a default that depends on other settings.
        path: ``file`` for a file or folder, ``spec`` for a data or pairs spec (``synthetic:...``, ``rec:DIR``, a
            path): made absolute when the run starts and saved that way.
    """

    key: str
    type: click.ParamType
    help: str
    default: Any = None
    resumable: bool = False
    saved: bool = True
    flag: str | None = None
    shown_default: str | None = None
    path: str | None = None

    @property
    def option(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")

    def real_default(self) -> Any:
        config_fields = {f.name: f for f in fields(TrainConfig)}
        if self.default is None and self.key in config_fields:
            f = config_fields[self.key]
            return f.default_factory() if f.default is MISSING else f.default
        return self.default

    def convert(self, value: Any, source: str) -> Any:
        """``value`` checked and converted by this setting's type; a bad one is a one-line EdgekdError."""
        # click would read True as 1 and truncate 1.5 to 1; a config file that says so is a mistake.
        not_bool = isinstance(value, bool) and self.type is not click.BOOL
        not_int = (
            isinstance(value, float) and not value.is_integer() and isinstance(self.type, click.types.IntParamType)
        )
        if not_bool or not_int:
            raise EdgekdError(f"{source}: {self.key} = {value!r} is not a valid {self.type.name}")
        try:
            return self.type.convert(value, None, None)
        except click.BadParameter as exc:
            raise EdgekdError(f"{source}: {self.key}: {exc.format_message()}") from None


# Shared by `edgekd teacher` and `edgekd distill`, in --help order.
TRAIN_SETTINGS = [
    Setting(
        "data",
        click.STRING,
        "training data: synthetic[:k=v,...], fmnist, an image folder or a train.rec folder",
        shown_default="the demo: 200 synthetic identities x 20 images, 32 px",
        path="spec",
    ),
    Setting("model", ModelName(), "backbone (see `python -m edgekd.models`): mbf, r50, timm/resnet18, ..."),
    Setting("model_kwargs", JSONObject(), "extra backbone arguments as JSON, e.g. '{\"embed_dim\": 256}'"),
    Setting("head", click.Choice(list(HEAD_KINDS)), "class head kind"),
    Setting("scale", positive(float), "scale s of normalized heads"),
    Setting(
        "margin",
        click.FloatRange(0, math.pi / 2, max_open=True),
        "margin m (ArcFace radians, CosFace cosine)",
        shown_default="0.5 ArcFace, 0.4 CosFace, 0 otherwise",
    ),
    Setting("image_size", click.IntRange(min=8), "input height = width", shown_default="the data's own size"),
    Setting("batch_size", positive(int), "images per step"),
    Setting("steps", positive(int), "total training steps (overrides --epochs)"),
    Setting("epochs", positive(float), "training length in epochs"),
    Setting("lr", positive(float), "peak SGD learning rate"),
    Setting("momentum", click.FloatRange(0, 1, max_open=True), "SGD momentum"),
    Setting("weight_decay", non_negative(float), "SGD weight decay"),
    Setting("warmup_steps", non_negative(int), "linear warm-up steps before the polynomial decay"),
    Setting("lr_power", positive(float), "power of the polynomial decay to 0 (1: linear, as arcface_torch)"),
    Setting("clip_grad", non_negative(float), "gradient-norm clip (0: off)"),
    Setting("flip", click.BOOL, "random horizontal flips", flag="--flip/--no-flip"),
    Setting("seed", non_negative(int), "seed of initialization, data order and flips"),
    Setting("device", DeviceType(), "auto, cpu, cuda or cuda:N", resumable=True),
    Setting("num_workers", non_negative(int), "data-loading worker processes", resumable=True, flag="--workers"),
    Setting(
        "compile",
        click.BOOL,
        "torch.compile the training step",
        resumable=True,
        flag="--compile/--no-compile",
    ),
    Setting(
        "threads",
        positive(int),
        "torch CPU threads",
        resumable=True,
        shown_default="the usable CPUs; passive OpenMP waits on a busy machine (README: Threads)",
    ),
    Setting(
        "nproc",
        positive(int),
        "training processes on this machine, one per GPU: N > 1 runs the command under torchrun with the same "
        "arguments; --batch-size stays the global batch (README: Multi-GPU training)",
        default=1,
        resumable=True,
        saved=False,
        shown_default="1, or torchrun's world when torchrun started edgekd",
    ),
    Setting("checkpoint_every", positive(int), "steps between checkpoints", resumable=True),
    Setting("keep_checkpoints", positive(int), "newest checkpoints kept", resumable=True),
    Setting("log_every", positive(int), "steps between metrics.jsonl lines", resumable=True),
    Setting(
        "stop_after",
        positive(int),
        "stop this invocation after N steps (time-sliced jobs); --resume continues",
        resumable=True,
        saved=False,
    ),
]


def add_options(settings: list[Setting], demo: dict) -> Callable:
    """Decorate a click command with ``settings`` (every default None, shown in --help) plus --config/--resume."""

    def decorate(func):
        for s in reversed(settings):
            func = click.option(
                s.option,
                s.key,
                type=None if "/" in s.option else s.type,
                default=None,
                help=f"{s.help}  [default: {_default_text(s, demo)}]",
            )(func)
        func = click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            default=None,
            help="YAML/TOML/JSON file of settings (keys as the long option names with _); the command line wins",
        )(func)
        return click.option(
            "--resume",
            is_flag=True,
            help="continue the run in --out with its saved settings, from its newest checkpoint (paths are saved "
            "absolute, so it resumes from any working directory)",
        )(func)

    return decorate


def _default_text(setting: Setting, demo: dict) -> str:
    value = setting.real_default()
    if setting.shown_default:
        return setting.shown_default
    text = "none" if value is None else ("on" if value is True else "off" if value is False else str(value))
    if setting.key in demo:
        text += f"; demo: {demo[setting.key]}"
    return text


def read_config_file(path: str | Path, settings: list[Setting]) -> dict:
    """The settings in a YAML/TOML/JSON file, each checked by its setting's type; unknown keys are an error."""
    path = Path(path)
    if not path.is_file():
        raise EdgekdError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            raw = json.loads(text)
        else:
            raise EdgekdError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    except EdgekdError:
        raise
    except Exception as exc:
        raise EdgekdError(f"cannot parse config file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise EdgekdError(f"config file {path} must hold a mapping of setting names to values")
    # Keys are the settings' keys or their long option names with "_" (`workers` for num_workers).
    by_key = {s.key: s for s in settings}
    by_key.update({s.option.split("/")[0][2:].replace("-", "_"): s for s in settings})
    unknown = sorted(set(raw) - set(by_key))
    if unknown:
        valid = ", ".join(s.key for s in settings)
        raise EdgekdError(f"config file {path}: unknown keys {', '.join(unknown)}; valid keys: {valid}")
    return {by_key[key].key: by_key[key].convert(value, f"config file {path}") for key, value in raw.items()}


def resolve_settings(
    command: str, kwargs: dict, settings: list[Setting], demo: dict, default_out: str
) -> tuple[dict, bool]:
    """Every setting's value for this invocation, and whether it resumes a run; see the module doc.

    ``kwargs`` are click's values (None where not given) plus ``config_file`` and ``resume``.
    """
    config_file, resume = kwargs.pop("config_file", None), bool(kwargs.pop("resume", False))
    explicit = read_config_file(config_file, settings) if config_file else {}
    explicit.update({k: v for k, v in kwargs.items() if v is not None})
    # A scheduler may start the resumed job in another folder: the run keeps absolute paths, not the typed ones.
    explicit = {k: absolute_path(_setting(settings, k), v) for k, v in explicit.items()}
    out = Path(os.path.abspath(explicit.get("out") or default_out))
    if out.exists() and not out.is_dir():
        raise EdgekdError(f"--out {out} is a file; give a folder for the run")
    if resume:
        saved = load_settings(out, command)
        _keep_saved_spelling(saved, explicit, settings)
        _refuse_meaning_changes(saved, explicit, settings, command, out)
        # A setting newer than the run's settings.json takes its default, the value the run had in effect.
        values = {**{s.key: s.real_default() for s in settings}, **saved, **explicit}
    else:
        if (out / SETTINGS_FILE).is_file():
            raise EdgekdError(
                f"{out} holds a run already; continue it with `edgekd {command} --out {out} --resume` "
                "or choose a new --out"
            )
        values = {s.key: s.real_default() for s in settings}
        if "data" not in explicit:
            values.update({k: v for k, v in demo.items() if k in values})
        values.update(explicit)
    if values.get("margin") is None and "head" in values:
        values["margin"] = default_margin(values["head"])
    values["out"] = str(out)
    return values, resume


def absolute_path(setting: Setting | None, value: Any) -> Any:
    """``value`` with its path made absolute against the working directory when ``setting`` holds one."""
    if setting is None or setting.path is None or not isinstance(value, str):
        return value
    if setting.path == "spec":
        return absolute_spec(value)
    return os.path.abspath(os.path.expanduser(value))


def _setting(settings: list[Setting], key: str) -> Setting | None:
    return next((s for s in settings if s.key == key), None)


def _keep_saved_spelling(saved: dict, explicit: dict, settings: list[Setting]) -> None:
    """An option that names the saved path again takes the saved spelling (in place).

    settings.json files from before paths were saved absolute hold them as typed, relative to the folder the run
    started in, and such a run resumes from there: a path given again, in any spelling, is no change of meaning, and
    the run keeps the string it trained with (the caches of its teacher and vanilla student are keyed by it).
    """
    for s in settings:
        if s.path and s.key in explicit and isinstance(saved.get(s.key), str):
            if absolute_path(s, saved[s.key]) == explicit[s.key]:
                explicit[s.key] = saved[s.key]


def _refuse_meaning_changes(saved: dict, explicit: dict, settings: list[Setting], command: str, out: Path) -> None:
    for s in settings:
        if s.key in explicit and s.saved and not s.resumable and explicit[s.key] != saved.get(s.key):
            raise EdgekdError(
                f"--resume: {s.option.split('/')[0]} was {saved.get(s.key)!r} when the run in {out} started and "
                f"is {explicit[s.key]!r} now; drop the option to continue (`edgekd {command} --out {out} --resume`) "
                "or start a new run with another --out"
            )


def load_settings(out: Path, command: str) -> dict:
    """The saved settings of the run in ``out``; a one-line error when there is none to resume."""
    path = Path(out) / SETTINGS_FILE
    if not path.is_file():
        raise EdgekdError(f"--resume: {out} holds no edgekd run (no {SETTINGS_FILE}); drop --resume to start one")
    try:
        saved = json.loads(path.read_text())
        values = saved["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EdgekdError(f"--resume: {path} is unreadable; start a new run with another --out") from None
    if saved.get("command") != command:
        raise EdgekdError(
            f"--resume: {out} holds an `edgekd {saved.get('command')}` run, not `edgekd {command}`; "
            f"resume it with `edgekd {saved.get('command')} --out {out} --resume`"
        )
    return values


def save_settings(out: Path, command: str, values: dict, settings: list[Setting]) -> None:
    """Write the run's resolved settings (less the per-invocation ones) to ``out/settings.json``."""
    per_invocation = {s.key for s in settings if not s.saved}
    kept = {k: v for k, v in values.items() if k not in per_invocation}
    write_json(Path(out) / SETTINGS_FILE, {"command": command, "edgekd": __version__, "settings": kept})


def describe_settings(values: dict, settings: list[Setting]) -> str:
    """One line ``settings: key=value ...`` in --help order, for the start of a run's log."""
    shown = [f"{s.key}={values[s.key]}" for s in settings if values.get(s.key) is not None]
    return "settings: " + " ".join(shown)


def invocation_argv() -> list[str]:
    """The arguments this ``edgekd`` command was run with (what ``--nproc`` passes on to each rank)."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_object(dict) if ctx is not None else None
    return list(obj["argv"]) if obj and "argv" in obj else sys.argv[1:]


def train_config(values: dict) -> TrainConfig:
    """The ``TrainConfig`` part of resolved settings."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names})
