"""The one schema of the training commands' settings (``edgekd teacher``, ``edgekd distill``).

Each ``Setting`` names its click type and range, its help, its default and whether a resumed run may change it.
The same rules (``edgekd.rules``; a ``TrainConfig`` field's own rule for training settings) check the command line
and config files: ``batch_size: sixty``, ``lr: [0.1]``, ``lr: true``, ``steps: 10.5``, ``lr: .nan`` and
``--lr nan`` are one-line errors naming the key, the value and what to give. A config file's values must have the
setting's type: ``lr: "0.1"`` (a string) is refused, while ``lr: 1e-3`` is a number (YAML 1.2 reads it so; PyYAML's
YAML 1.1 would read a string), and ``null`` means the default only where that default is None (``steps: null``).

Defaults live in one place each: ``TrainConfig`` for training settings (the face-standard values used on real data),
``Setting.default`` for command settings, and ``DEMO`` for the built-in demo, which applies only when no ``--data``
is given.

``resolve_settings`` layers them: defaults < demo (no data given) < config file < command line; with ``--resume``
the run's saved ``settings.json`` replaces the defaults, and an option that would change the run's meaning is a
one-line error naming both values. Paths (``--data``, ``--teacher``, ``--pairs``, ``--out``, ...) are made absolute
against the working directory before anything else, so the saved run names its files from wherever it resumes.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import sys
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any

import click

from edgekd.atomic import write_json
from edgekd.cli.arcface_config import Run, margin_list_head, read_python_config, translate
from edgekd.data import absolute_spec
from edgekd.distributed.launch import launched
from edgekd.errors import EdgekdError
from edgekd.formats import read_versioned_json, stamp
from edgekd.heads import HEAD_KINDS, default_margin
from edgekd.models import check_model_kwargs, require_model
from edgekd.rules import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, Rule, is_int
from edgekd.train.config import TrainConfig, field_rule
from edgekd.train.precision import AMP_MODES
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


class Number(click.FloatRange):
    """A number its ``Rule`` accepts: ``--lr nan``, ``--lr inf``, ``--steps 10.5`` are refused (click's FloatRange takes
    NaN and ±inf). A ``FloatRange`` only so that --help shows the range the way click shows its own."""

    def __init__(self, rule: Rule) -> None:
        super().__init__(min=rule.low, max=rule.high, min_open=rule.low_open, max_open=rule.high_open)
        self.rule = rule
        self.name = "integer range" if rule.kind is int else "float range"

    def convert(self, value, param, ctx):
        number = _number_in(value) if isinstance(value, str) else value
        if not self.rule.accepts(number):
            self.fail(f"{value!r} is not {self.rule.expected()}", param, ctx)
        return self.rule.as_kind(number)


class MarginList(click.ParamType):
    """arcface_torch's combined margin ``m1,m2,m3`` (``1,0.5,0``), one of the combinations edgekd's heads are
    (``margin_list_head``)."""

    name = "m1,m2,m3"

    def convert(self, value, param, ctx):
        parts = value if isinstance(value, (list, tuple)) else [_number_in(p.strip()) for p in str(value).split(",")]
        try:
            margin_list_head(parts, "")
        except EdgekdError as exc:
            self.fail(str(exc), param, ctx)
        return tuple(float(p) for p in parts)


def _number_in(text: str) -> int | float | str:
    """The number ``text`` spells (an int where it is one), or ``text`` itself where it spells none."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def positive(kind: type) -> Number:
    return Number(POSITIVE_INT if kind is int else POSITIVE)


def non_negative(kind: type) -> Number:
    return Number(NON_NEGATIVE_INT if kind is int else NON_NEGATIVE)


def field_number(key: str) -> Number:
    """The command-line type of the ``TrainConfig`` number field ``key``: the field's own rule, so both check alike."""
    return Number(field_rule(key))


@dataclass(frozen=True)
class Setting:
    """One option of a training command.

    Args:
        key: the config key (a ``TrainConfig`` field, or a command-level value).
        type: click type and range; checks the command line and config files alike. A number is a ``Number`` of a
            ``Rule`` (``field_number(key)`` for a ``TrainConfig`` field: the field's own rule).
        help: the option's help text.
        default: default on real data; None for a ``TrainConfig`` key means the dataclass default.
        resumable: a resumed run may change it (where or how fast it runs, not what it trains).
        saved: restored by ``--resume``; False for per-invocation values such as ``--stop-after``.
        flag: the option; default ``--key-with-dashes``. A ``--x/--no-x`` pair for booleans.
        shown_default: --help's text for a default that depends on other settings.
        path: ``file`` for a file or folder, ``spec`` for a data or pairs spec (``synthetic:...``, ``rec:DIR``, a
            path): made absolute when the run starts and saved that way.
        aliases: ``(flag, value)`` pairs, each a flag that gives the setting one value (``--fp16`` is ``--amp fp16``).
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
    aliases: tuple[tuple[str, Any], ...] = ()

    @property
    def option(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")

    def real_default(self) -> Any:
        config_fields = {f.name: f for f in fields(TrainConfig)}
        if self.default is None and self.key in config_fields:
            f = config_fields[self.key]
            return f.default_factory() if f.default is MISSING else f.default
        return self.default

    @property
    def rule(self) -> Rule:
        """What a config file may give: a number's rule, else the kind of value the click type takes (a click type
        would read ``true`` as 1, ``1.5`` as 1 and ``[1]`` as "[1]"); null only where the default is None."""
        if isinstance(self.type, Number):
            rule = self.type.rule
        elif isinstance(self.type, click.types.BoolParamType):
            rule = Rule(bool)
        else:
            rule = Rule(dict if isinstance(self.type, JSONObject) else str)
        return replace(rule, optional=self.real_default() is None)

    def convert(self, value: Any, source: str) -> Any:
        """``value`` from ``source`` (a config file) as this setting takes it; a bad one is a one-line EdgekdError
        naming the key, the value, what to give and an example (the default)."""
        default = self.real_default()
        example = None if default is None else f"{self.key}: {json.dumps(default)}"
        value = self.rule.check(self.key, value, where=f"{source}: ", example=example)
        if value is None or isinstance(self.type, Number):
            return value
        try:  # choices, devices, model names, paths
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
    Setting(
        "embedding_size",
        positive(int),
        "embedding width of the backbone (arcface_torch's embedding_size): --model-kwargs '{\"embed_dim\": N}'",
        shown_default="the model's own: 512 for mbf and r50",
    ),
    Setting("head", click.Choice(list(HEAD_KINDS)), "class head kind"),
    Setting("scale", field_number("scale"), "scale s of normalized heads"),
    Setting(
        "margin",
        field_number("margin"),
        "margin m (ArcFace radians, CosFace cosine)",
        shown_default="0.5 ArcFace, 0.4 CosFace, 0 otherwise",
    ),
    Setting(
        "margin_list",
        MarginList(),
        "arcface_torch's margin_list instead of --head and --margin: 1,m,0 is --head arcface --margin m, 1,0,m "
        "--head cosface --margin m, 1,0,0 --head cosine; the combined margin is not supported",
        saved=False,  # saved as the head and margin it sets
    ),
    Setting("image_size", field_number("image_size"), "input height = width", shown_default="the data's own size"),
    Setting(
        "batch_size",
        field_number("batch_size"),
        "images per step: the global batch over all processes (arcface_torch's batch_size is per GPU: multiply by "
        "the GPU count)",
    ),
    Setting("steps", field_number("steps"), "total training steps (overrides --epochs)"),
    Setting("epochs", field_number("epochs"), "training length in epochs"),
    Setting("lr", field_number("lr"), "peak SGD learning rate"),
    Setting("momentum", field_number("momentum"), "SGD momentum"),
    Setting("weight_decay", field_number("weight_decay"), "SGD weight decay"),
    Setting(
        "warmup_steps",
        field_number("warmup_steps"),
        "linear warm-up steps before the polynomial decay (or --warmup-epochs)",
    ),
    Setting(
        "warmup_epochs",
        field_number("warmup_epochs"),
        "linear warm-up in epochs instead of --warmup-steps (arcface_torch's warmup_epoch): E x the steps of an "
        "epoch, rounded up",
        shown_default="none",
    ),
    Setting("lr_power", field_number("lr_power"), "power of the polynomial decay to 0 (1: linear, as arcface_torch)"),
    Setting("clip_grad", field_number("clip_grad"), "gradient-norm clip (0: off)"),
    Setting(
        "sample_rate",
        field_number("sample_rate"),
        "Partial FC: the share of the head's classes each step computes, every class of the batch plus random others "
        "(arcface_torch's sample_rate; under torchrun per class shard); 1 is the exact loss",
    ),
    Setting("flip", click.BOOL, "random horizontal flips", flag="--flip/--no-flip"),
    Setting(
        "skip_bad",
        click.BOOL,
        "leave out training images or records that cannot be decoded (counted and named at the start) instead of "
        "stopping at the first",
        flag="--skip-bad/--no-skip-bad",
    ),
    Setting("seed", field_number("seed"), "seed of initialization, data order and flips"),
    Setting(
        "amp",
        click.Choice(AMP_MODES),
        "precision of the backbone's forward (autocast): auto is bf16 on CUDA, fp32 on the CPU; fp16 scales the loss "
        "(arcface_torch's fp16); weights, gradients and the loss stay float32",
        aliases=(("--bf16", "bf16"), ("--fp16", "fp16"), ("--fp32", "fp32")),
    ),
    Setting("device", DeviceType(), "auto, cpu, cuda or cuda:N", resumable=True),
    Setting(
        "num_workers", field_number("num_workers"), "data-loading worker processes", resumable=True, flag="--workers"
    ),
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
    Setting("checkpoint_every", field_number("checkpoint_every"), "steps between checkpoints", resumable=True),
    Setting("keep_checkpoints", field_number("keep_checkpoints"), "newest checkpoints kept", resumable=True),
    Setting("log_every", field_number("log_every"), "steps between metrics.jsonl lines", resumable=True),
    Setting(
        "eval_every",
        field_number("eval_every"),
        "verify on the evaluation pair sets every N steps (arcface_torch's callback): scores in metrics.jsonl, the "
        "best backbone kept as best.safetensors",
        resumable=True,
        shown_default="off",
    ),
    Setting(
        "tensorboard",
        click.BOOL,
        "also write the logged scalars (losses, lr, images/s, verification) as TensorBoard events in <run>/tensorboard "
        "(pip install 'edgekd[tensorboard]')",
        resumable=True,
        flag="--tensorboard/--no-tensorboard",
    ),
    Setting(
        "stop_after",
        field_number("stop_after"),
        "stop this invocation after N steps (time-sliced jobs); --resume continues",
        resumable=True,
        saved=False,
    ),
]


def add_options(settings: list[Setting], demo: dict) -> Callable:
    """Decorate a click command with ``settings`` (every default None, shown in --help) plus --config/--resume."""

    def decorate(func):
        for s in reversed(settings):
            for flag, value in reversed(s.aliases):  # listed in --help after the setting's own option
                func = click.option(flag, s.key, flag_value=value, default=None, help=f"{s.option} {value}")(func)
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
            help="YAML/TOML/JSON file of settings (keys as the long option names with _), or an arcface_torch config "
            "(.py: its config.KEY = value lines are read, never run; its keys work in YAML/JSON too, each mapping "
            "printed); the command line wins",
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


def read_config_file(
    path: str | Path, settings: list[Setting], given: dict | None = None, echo: Callable[[str], None] = click.echo
) -> dict:
    """The settings in a YAML/TOML/JSON file or an arcface_torch config, each checked by its setting's rule and type;
    unknown keys are an error (with the closest key), and null, where a setting's default is None, is the same as
    leaving the key out.

    arcface_torch's keys become edgekd's (``edgekd.cli.arcface_config``), each mapping said in a line to ``echo`` by
    the process that speaks for the run. ``given``: the command line's values, which decide what the mapping needs
    (``--nproc`` for a per-GPU batch, ``--data`` for the .bin sets ``val_targets`` names).
    """
    path = Path(path)
    raw = _parse_config_file(path)
    run = _arcface_run(raw, settings, given or {})
    raw, notes = translate(raw, path, run)
    if notes and _speaks_for_run(run.processes):
        echo(f"--config {path}: arcface_torch's keys as edgekd's options")
        for note in notes:
            echo(f"  {note}")
    return check_setting_values(raw, settings, f"--config {path}")


def _arcface_run(raw: dict, settings: list[Setting], given: dict) -> Run:
    """What mapping arcface_torch's keys needs to know of the run (``arcface_config.Run``). Its processes: torchrun's
    world when torchrun started this one, else --nproc (a per-GPU batch times them is the global batch)."""
    nproc = given.get("nproc", raw.get("nproc"))
    processes = int(os.environ["WORLD_SIZE"]) if launched() else nproc if is_int(nproc) and nproc > 0 else 1
    data = given.get("data", raw.get("rec", raw.get("data")))
    pairs = given.get("pairs", raw.get("pairs"))
    return Run(
        options={s.key: s.option.split("/")[0] for s in settings},
        processes=processes,
        data=data if isinstance(data, str) else None,
        pairs=pairs if isinstance(pairs, str) else None,
    )


def _speaks_for_run(processes: int) -> bool:
    """Whether this process prints the run's notes: rank 0, and not the process that starts --nproc ranks (their
    rank 0 prints them)."""
    return os.environ.get("RANK", "0") == "0" and (processes == 1 or launched())


def check_setting_values(raw: dict, settings: list[Setting], source: str) -> dict:
    """``raw`` (a config file's mapping, or the Python API's keyword arguments) checked as a config file's values
    are: each by its setting's rule and type, unknown keys an error naming ``source`` and the closest key."""
    # Keys are the settings' keys or their long option names with "_" (`workers` for num_workers).
    by_key = {s.key: s for s in settings}
    by_key.update({s.option.split("/")[0][2:].replace("-", "_"): s for s in settings})
    unknown = sorted((key for key in raw if key not in by_key), key=str)  # YAML keys may be numbers or null
    if unknown:
        raise EdgekdError(f"{source}: {_unknown_keys_text(unknown, list(by_key), [s.key for s in settings])}")
    values = {by_key[key].key: by_key[key].convert(value, source) for key, value in raw.items()}
    return {key: value for key, value in values.items() if value is not None}


def _parse_config_file(path: Path) -> dict:
    """The mapping a YAML/TOML/JSON file holds; a missing, unreadable or unparsable file is a one-line error."""
    if not path.is_file():
        raise EdgekdError(f"config file {path} does not exist")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json", ".py"):
        raise EdgekdError(f"config file {path} must end in .yaml, .yml, .toml, .json or .py (an arcface_torch config)")
    try:
        text = path.read_text()
        if path.suffix == ".py":
            return read_python_config(path)
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix == ".json":
            raw = json.loads(text)
        else:
            raw = _load_yaml(text) or {}
    except Exception as exc:
        raise EdgekdError(f"cannot parse config file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise EdgekdError(f"config file {path} must hold a mapping of setting names to values")
    return raw


def _load_yaml(text: str) -> Any:
    """``text`` read by PyYAML's safe loader, with ``1e-3`` the number YAML 1.2 (and every reader) sees, not YAML 1.1's
    string: config values must have their setting's type, and a learning rate is written so."""
    import yaml  # here, not at the top: only a YAML config file needs it

    class Loader(yaml.SafeLoader):
        pass

    exponent = re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789."))
    return yaml.load(text, Loader=Loader)


def _unknown_keys_text(unknown: list, keys: list[str], shown: list[str]) -> str:
    """``unknown key lrr; did you mean lr?``, or the valid keys (``shown``) where no key in ``keys`` is close."""
    guesses = {key: difflib.get_close_matches(str(key), keys, n=1) for key in unknown}
    close = [f"{match[0]}" + (f" for {key}" if len(unknown) > 1 else "") for key, match in guesses.items() if match]
    hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(shown)}"
    return f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(str(key) for key in unknown)}; {hint}"


def resolve_settings(
    command: str,
    kwargs: dict,
    settings: list[Setting],
    demo: dict,
    default_out: str,
    echo: Callable[[str], None] = click.echo,
) -> tuple[dict, bool]:
    """Every setting's value for this invocation, and whether it resumes a run; see the module doc.

    ``kwargs`` are click's values (None where not given) plus ``config_file`` and ``resume``. ``echo``: where the
    mapping of an arcface_torch config file is said.
    """
    config_file, resume = kwargs.pop("config_file", None), bool(kwargs.pop("resume", False))
    given = _margin_list_applied({k: v for k, v in kwargs.items() if v is not None})
    from_file = read_config_file(config_file, settings, given, echo) if config_file else {}
    explicit = _command_line_over_file(from_file, given)
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
                f"{out} holds a run already; continue it with `{resume_line(command, out)}` or choose a new --out"
            )
        values = {s.key: s.real_default() for s in settings}
        if "data" not in explicit:
            values.update({k: v for k, v in demo.items() if k in values})
        values.update(explicit)
    if values.get("warmup_epochs") is not None and "warmup_steps" not in explicit:
        values["warmup_steps"] = 0  # a warm-up asked for in epochs replaces the demo's in steps
    _embedding_size_applied(values)
    if values.get("margin") is None and "head" in values:
        values["margin"] = default_margin(values["head"])
    values["out"] = str(out)
    return values, resume


def _margin_list_applied(given: dict) -> dict:
    """``given`` with ``--margin-list`` replaced by the --head and --margin it names; given with either of them it
    is a one-line error (which one was meant?)."""
    if given.get("margin_list") is None:
        return given
    given = dict(given)
    margins = given.pop("margin_list")
    clash = next((key for key in ("head", "margin") if key in given), None)
    if clash:
        raise EdgekdError(f"--margin-list sets --head and --margin; drop --{clash} or --margin-list")
    head, margin = margin_list_head(margins, "")
    return {**given, "head": head, "margin": margin}


def _command_line_over_file(from_file: dict, given: dict) -> dict:
    """The config file's settings with the command line's over them. The warm-up is given in steps or in epochs:
    both in one place is a one-line error, and either on the command line replaces the file's."""
    warmup = ("warmup_steps", "warmup_epochs")
    for layer, where in ((from_file, "in the config file"), (given, "on the command line")):
        if all(key in layer for key in warmup):
            raise EdgekdError(
                f"--warmup-steps {layer['warmup_steps']} and --warmup-epochs {layer['warmup_epochs']} are both "
                f"given {where}; give one"
            )
    if any(key in given for key in warmup):
        from_file = {k: v for k, v in from_file.items() if k not in warmup}
    return {**from_file, **given}


def _embedding_size_applied(values: dict) -> None:
    """``--embedding-size`` as the model's ``embed_dim`` in ``model_kwargs`` (in place), which the checkpoints
    rebuild the model from. An embed_dim of another value in --model-kwargs, or a model without one, is a one-line
    error."""
    size = values.get("embedding_size")
    if size is None:
        return
    kwargs = values.get("model_kwargs") or {}
    if kwargs.get("embed_dim", size) != size:
        raise EdgekdError(
            f"--embedding-size {size} and --model-kwargs embed_dim {kwargs['embed_dim']} disagree; give one of them"
        )
    try:
        check_model_kwargs(values["model"], {"embed_dim": size})
    except EdgekdError as exc:
        raise EdgekdError(f"--embedding-size {size}: {exc}") from None
    values["model_kwargs"] = {**kwargs, "embed_dim": size}


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
                f"is {explicit[s.key]!r} now; drop the option to continue (`{resume_line(command, out)}`) "
                "or start a new run with another --out"
            )


def resume_line(command: str, out: str | os.PathLike) -> str:
    """The command that continues the run in ``out``, quoted for a shell (a path may hold spaces)."""
    return shlex.join(["edgekd", command, "--out", str(out), "--resume"])


def load_settings(out: Path, command: str) -> dict:
    """The saved settings of the run in ``out``; a one-line error when there is none to resume, or its
    ``settings.json`` is unreadable or of a format this edgekd does not read (``edgekd.formats``)."""
    path = Path(out) / SETTINGS_FILE
    if not path.is_file():
        raise EdgekdError(f"--resume: {out} holds no edgekd run (no {SETTINGS_FILE}); drop --resume to start one")
    saved = read_versioned_json("settings", path)
    values = saved.get("settings")
    if not isinstance(values, dict):
        raise EdgekdError(f"--resume: {path} holds no settings; start a new run with another --out")
    if saved.get("command") != command:
        raise EdgekdError(
            f"--resume: {out} holds an `edgekd {saved.get('command')}` run, not `edgekd {command}`; "
            f"resume it with `{resume_line(str(saved.get('command')), out)}`"
        )
    return values


def save_settings(out: Path, command: str, values: dict, settings: list[Setting]) -> None:
    """Write the run's resolved settings (less the per-invocation ones) to ``out/settings.json``."""
    per_invocation = {s.key for s in settings if not s.saved}
    kept = {k: v for k, v in values.items() if k not in per_invocation}
    saved = {"command": command, "edgekd": __version__, "settings": kept}
    write_json(Path(out) / SETTINGS_FILE, stamp("settings", saved))


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
