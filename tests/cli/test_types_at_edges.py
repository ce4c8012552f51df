"""Types at the edges (issue 23, class 5): every value that reaches edgekd from a config file, the command line,
``--model-kwargs`` or the Python API is checked for type and range before any work starts.

A bad value is one line on stderr (exit 2, no traceback) naming the key, the value received and what to give. The
decisions these tests pin down:

* bools are not numbers (``lr: true``, ``flip: 1`` are refused);
* a decimal is not a whole number, ``10.0`` included (``steps: 10.0``, ``--steps 1e3``): nothing is truncated;
* an int is a float (``lr: 1`` is 1.0);
* a config file's strings are not numbers (``lr: "0.1"`` is refused), while YAML's ``1e-3`` is a number;
* ``null`` is the default only where that default is None (``steps: null``), refused elsewhere (``batch_size``);
* NaN and ±inf fail every float range, on the command line and in config files;
* model kwargs are checked against the model constructor's signature (names and annotated types), before building.
"""

import json
import math

import numpy as np
import pytest

from edgekd.cli.options import resolve_settings, train_config
from edgekd.cli.teacher import SETTINGS, TEACHER_DEMO
from edgekd.cli.teacher import command as teacher_command
from edgekd.errors import EdgekdError
from edgekd.models import check_model_kwargs
from edgekd.train.config import TrainConfig

DATA = "synthetic:identities=16,images_per_identity=4,image_size=16"
RUN = ["--data", DATA, "--model", "r_tiny", "--batch-size", "8", "--device", "cpu", "--no-compile"]
T = [*RUN, "--steps", "1"]

# (file name, contents, text the error line must hold): config-file values of every wrong type.
BAD_CONFIGS = [
    ("run.yaml", "lr: [0.1, 0.2]\n", "lr is a list ([0.1, 0.2])"),
    ("run.yaml", "lr: true\n", "lr is a boolean (true)"),
    ("run.yaml", 'lr: "0.1"\n', "lr is a string ('0.1')"),
    ("run.yaml", "lr: {value: 0.1}\n", "lr is a mapping"),
    ("run.yaml", "lr: .nan\n", "lr is nan"),
    ("run.yaml", "lr: -.inf\n", "lr is -inf"),
    ("run.yaml", "lr: 0\n", "lr is 0"),
    ("run.yaml", "steps: 10.5\n", "steps is a decimal number (10.5)"),
    ("run.yaml", "steps: 10.0\n", "steps is a decimal number (10.0)"),
    ("run.yaml", "batch_size: null\n", "batch_size is null"),
    ("run.yaml", "batch_size: sixty\n", "batch_size is a string ('sixty')"),
    ("run.yaml", "seed: 4294967296\n", "seed is 4294967296"),
    ("run.yaml", "momentum: 1.0\n", "momentum is 1.0"),
    ("run.yaml", "flip: 1\n", "flip is 1; give true or false"),
    ("run.yaml", "model: 5\n", "model is 5; give a string"),
    ("run.yaml", "data: null\n", "data is null"),
    ("run.yaml", "model_kwargs: [1, 2]\n", "model_kwargs is a list"),
    ("run.yaml", "model_kwargs: {1: 2}\n", "model_kwargs is a mapping with a key that is no name"),
    ("run.yaml", 'model_kwargs: {embed_dim: "64"}\n', "option embed_dim is a string ('64')"),
    ("run.yaml", "model_kwargs: {layers: [1, 1, x, 1]}\n", "option layers is a list"),
    ("run.yaml", "lrr: 0.1\n", "unknown key lrr; did you mean lr?"),
    ("run.yaml", "1: 2\n", "unknown key 1"),
    ("run.toml", "lr = nan\n", "lr is nan"),
    ("run.toml", "scale = inf\n", "scale is inf"),
    ("run.toml", "seed = 1979-05-27\n", "seed is a date"),
    ("run.toml", "warmup_steps = 2.5\n", "warmup_steps is a decimal number (2.5)"),
    ("run.json", '{"clip_grad": NaN}', "clip_grad is nan"),
    ("run.json", '{"weight_decay": -Infinity}', "weight_decay is -inf"),
    ("run.json", '{"epochs": 1e400}', "epochs is inf"),
    ("run.json", '{"image_size": "32"}', "image_size is a string ('32')"),
    ("run.json", '{"margin": [0.5]}', "margin is a list ([0.5])"),
    ("run.json", '{"log_every": false}', "log_every is a boolean (false)"),
    ("run.json", '{"model_kwargs": {"dropout": "0.1"}}', "option dropout is a string ('0.1')"),
]
BAD_DISTILL_CONFIGS = [
    ("run.yaml", "w_kd: .inf\n", "w_kd is inf"),
    ("run.yaml", "temperature: .nan\n", "temperature is nan"),
    ("run.yaml", "teacher_lr: true\n", "teacher_lr is a boolean (true)"),
    ("run.yaml", "teacher_epochs: [1]\n", "teacher_epochs is a list"),
    ("run.yaml", "eval: yes please\n", "eval is a string"),
]

# (command-line arguments, text the error line must hold): NaN/±inf for the float options, decimals for the ints,
# and --model-kwargs of wrong names, types and nested types.
BAD_ARGS = [
    (["--lr", "nan"], "'--lr': 'nan' is not a finite number > 0"),
    (["--lr", "inf"], "'--lr': 'inf'"),
    (["--lr", "-inf"], "'--lr': '-inf'"),
    (["--scale", "nan"], "'--scale': 'nan'"),
    (["--margin", "inf"], "'--margin': 'inf'"),
    (["--margin", "nan"], "'--margin': 'nan'"),
    (["--momentum", "nan"], "'--momentum': 'nan'"),
    (["--epochs", "inf"], "'--epochs': 'inf'"),
    (["--weight-decay", "nan"], "'--weight-decay': 'nan'"),
    (["--clip-grad", "inf"], "'--clip-grad': 'inf'"),
    (["--lr-power", "-inf"], "'--lr-power': '-inf'"),
    (["--steps", "10.5"], "'--steps': '10.5' is not a whole number >= 1"),
    (["--steps", "1e3"], "'--steps': '1e3'"),
    (["--batch-size", "8.0"], "'--batch-size': '8.0'"),
    (["--seed", "4294967296"], "'--seed': '4294967296'"),
    (["--model-kwargs", '{"embed_dim": "64"}'], "model 'r_tiny' option embed_dim is a string ('64')"),
    (["--model-kwargs", '{"embed_dim": 64.0}'], "option embed_dim is 64.0; give a whole number"),
    (["--model-kwargs", '{"embed_dim": true}'], "option embed_dim is a boolean (true)"),
    (["--model-kwargs", '{"dropout": NaN}'], "option dropout is nan; give a finite number"),
    (["--model-kwargs", '{"dropout": "0.1"}'], "option dropout is a string"),
    (["--model-kwargs", '{"layers": [1, "1", 1, 1]}'], "option layers is a list"),
    (["--model-kwargs", '{"input_size": [16, "16"]}'], "option input_size is a list"),
    (["--model-kwargs", '{"embed_dm": 64}'], "does not take option(s) embed_dm (did you mean embed_dim?)"),
    (["--model-kwargs", '{"scale": 2}'], "model 'r_tiny' does not take option(s) scale"),
]
BAD_DISTILL_ARGS = [
    (["--w-kd", "nan"], "'--w-kd': 'nan'"),
    (["--w-th-ce", "inf"], "'--w-th-ce': 'inf'"),
    (["--temperature", "inf"], "'--temperature': 'inf'"),
    (["--th-temperature", "-inf"], "'--th-temperature': '-inf'"),
    (["--teacher-lr", "nan"], "'--teacher-lr': 'nan'"),
    (["--teacher-epochs", "inf"], "'--teacher-epochs': 'inf'"),
]
# Float options of the deploy commands: refused while parsing, before the (missing) file is looked at.
BAD_DEPLOY_ARGS = [
    (["export", "--max-drop", "nan", "missing.safetensors"], "'--max-drop': 'nan'"),
    (["export", "--min-cosine", "inf", "missing.safetensors"], "'--min-cosine': 'inf'"),
    (["export", "--workspace-gib", "-inf", "missing.safetensors"], "'--workspace-gib': '-inf'"),
    (["benchmark-latency", "--min-seconds", "nan", "missing.onnx"], "'--min-seconds': 'nan'"),
    (["benchmark-latency", "--warmup-seconds", "inf", "missing.onnx"], "'--warmup-seconds': 'inf'"),
]

# (TrainConfig kwargs, text the error must hold): the Python API checks by the same rules.
BAD_CONFIG_OBJECTS = [
    ({"lr": [0.1, 0.2]}, "lr is a list"),
    ({"lr": float("nan")}, "lr is nan"),
    ({"scale": math.inf}, "scale is inf"),
    ({"lr": True}, "lr is a boolean (true)"),
    ({"steps": 10.5}, "steps is a decimal number (10.5)"),
    ({"batch_size": None}, "batch_size is null"),
    ({"compile": 1}, "compile is 1"),
    ({"data": 3}, "data is 3"),
    ({"model_kwargs": {"embed_dim": "64"}}, "option embed_dim is a string"),
    ({"model": "r_tiny", "model_kwargs": {"widths": (16, 32, 64, 128.5)}}, "option widths is a list"),
]


def ids(cases):
    return [" ".join(case[0]) if isinstance(case[0], list) else f"{case[0]}:{case[1].strip()}" for case in cases]


@pytest.mark.parametrize("name, text, fragment", BAD_CONFIGS, ids=ids(BAD_CONFIGS))
def test_bad_config_value_is_one_line_naming_key_and_value(name, text, fragment, tmp_path, run_cli, one_line):
    config, out = tmp_path / name, tmp_path / "run"
    config.write_text(text)
    code, _, err = run_cli(["teacher", *T, "--config", str(config), "--out", str(out)])
    one_line(code, err, fragment)
    assert not out.exists()


@pytest.mark.parametrize("name, text, fragment", BAD_DISTILL_CONFIGS, ids=ids(BAD_DISTILL_CONFIGS))
def test_bad_distill_config_value_is_one_line(name, text, fragment, tmp_path, run_cli, one_line):
    config, out = tmp_path / name, tmp_path / "run"
    config.write_text(text)
    code, _, err = run_cli(["distill", *T, "--config", str(config), "--out", str(out)])
    one_line(code, err, fragment)
    assert not out.exists()


def test_config_message_says_what_to_give(tmp_path, run_cli, one_line):
    config = tmp_path / "run.yaml"
    config.write_text("lr: [0.1, 0.2]\n")
    code, _, err = run_cli(["teacher", *T, "--config", str(config), "--out", str(tmp_path / "run")])
    one_line(code, err, f"--config {config}: lr is a list ([0.1, 0.2]); give a finite number > 0, e.g. lr: 0.1")


@pytest.mark.parametrize("extra, fragment", BAD_ARGS, ids=ids(BAD_ARGS))
def test_bad_option_value_is_one_line(extra, fragment, tmp_path, run_cli, one_line):
    out = tmp_path / "run"
    code, _, err = run_cli(["teacher", *T, *extra, "--out", str(out)])
    one_line(code, err, fragment)
    assert not out.exists()


@pytest.mark.parametrize("extra, fragment", BAD_DISTILL_ARGS, ids=ids(BAD_DISTILL_ARGS))
def test_bad_distill_option_value_is_one_line(extra, fragment, tmp_path, run_cli, one_line):
    out = tmp_path / "run"
    code, _, err = run_cli(["distill", *T, *extra, "--out", str(out)])
    one_line(code, err, fragment)
    assert not out.exists()


@pytest.mark.parametrize("argv, fragment", BAD_DEPLOY_ARGS, ids=ids(BAD_DEPLOY_ARGS))
def test_nan_and_inf_fail_the_deploy_commands_float_ranges(argv, fragment, run_cli, one_line):
    code, _, err = run_cli(argv)
    one_line(code, err, fragment)


@pytest.mark.parametrize("kwargs, fragment", BAD_CONFIG_OBJECTS, ids=[str(k) for k, _ in BAD_CONFIG_OBJECTS])
def test_train_config_checks_by_the_same_rules(kwargs, fragment):
    with pytest.raises(EdgekdError) as error:
        TrainConfig(**kwargs)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_model_kwargs_are_checked_without_building_the_model():
    check_model_kwargs("timm/resnet10t", {"drop_rate": 0, "timm_kwargs": {"zero_init_last": False}})
    with pytest.raises(EdgekdError, match="model 'timm/resnet10t' option timm_kwargs is a list"):
        check_model_kwargs("timm/resnet10t", {"timm_kwargs": [1]})
    with pytest.raises(EdgekdError, match="option blocks is a list"):
        check_model_kwargs("mbf_tiny", {"blocks": [1, 2, 2, None]})


# Unusual but valid: (file name, contents, settings the run must resolve to). Checked up to the TrainConfig the
# command builds (the command line's parsing, the config file, the layering), without training.
GOOD_CONFIGS = [
    ("run.yaml", "lr: 1e-1\n", {"lr": 0.1}),
    ("run.yaml", "lr: 1\n", {"lr": 1.0}),
    ("run.yaml", "lr: 5E-2\nepochs: 2\n", {"lr": 0.05, "epochs": 2.0}),
    ("run.yaml", "steps: null\nmargin: null\n", {"steps": None, "margin": 0.5}),  # null: the default (ArcFace's m)
    ("run.yaml", "margin: 0\nmomentum: 0\nclip_grad: 0\n", {"margin": 0.0, "momentum": 0.0, "clip_grad": 0.0}),
    ("run.yaml", "seed: 4294967295\nworkers: 0\nflip: no\n", {"seed": 4294967295, "num_workers": 0, "flip": False}),
    ("run.yaml", "model_kwargs: {embed_dim: 64, dropout: 0}\n", {"model_kwargs": {"embed_dim": 64, "dropout": 0}}),
    ("run.yaml", "model_kwargs: {input_size: [16, 16]}\n", {"model_kwargs": {"input_size": [16, 16]}}),
    ("run.toml", "lr = 1\nscale = 16\nimage_size = 16\n", {"lr": 1.0, "scale": 16.0, "image_size": 16}),
    ("run.toml", "[model_kwargs]\nembed_dim = 32\n", {"model_kwargs": {"embed_dim": 32}}),
    ("run.json", '{"lr": 1e-1, "warmup_steps": 0, "stop_after": null}', {"lr": 0.1, "stop_after": None}),
    # null in model kwargs leaves the model's own default (create_model drops it)
    (
        "run.json",
        '{"model_kwargs": {"embed_dim": 64, "in_chans": null}}',
        {"model_kwargs": {"embed_dim": 64, "in_chans": None}},
    ),
]
GOOD_ARGS = [
    (["--lr", "1e-1"], {"lr": 0.1}),
    (["--lr", "1"], {"lr": 1.0}),
    (["--margin", "0", "--momentum", "0.0"], {"margin": 0.0, "momentum": 0.0}),
    (["--seed", "4294967295"], {"seed": 4294967295}),
    (["--model-kwargs", '{"embed_dim": 64, "dropout": 0}'], {"model_kwargs": {"embed_dim": 64, "dropout": 0}}),
]


def resolved_config(argv: list[str], out) -> TrainConfig:
    """The TrainConfig `edgekd teacher ARGV` would train with: its own parsing, layering and checks, no training."""
    kwargs = dict(teacher_command.make_context("teacher", [*argv, "--out", str(out)]).params)
    values, _ = resolve_settings("teacher", kwargs, SETTINGS, TEACHER_DEMO, default_out=str(out))
    return train_config(values)


@pytest.mark.parametrize("name, text, expected", GOOD_CONFIGS, ids=ids(GOOD_CONFIGS))
def test_unusual_but_valid_config_values_resolve(name, text, expected, tmp_path):
    config = tmp_path / name
    config.write_text(text)
    cfg = resolved_config([*RUN, "--config", str(config)], tmp_path / "run")
    for key, value in expected.items():
        assert getattr(cfg, key) == value and type(getattr(cfg, key)) is type(value), (key, getattr(cfg, key))


@pytest.mark.parametrize("extra, expected", GOOD_ARGS, ids=ids(GOOD_ARGS))
def test_unusual_but_valid_option_values_resolve(extra, expected, tmp_path):
    cfg = resolved_config([*RUN, *extra], tmp_path / "run")
    for key, value in expected.items():
        assert getattr(cfg, key) == value and type(getattr(cfg, key)) is type(value), (key, getattr(cfg, key))


def test_train_config_takes_numbers_of_other_types():
    cfg = TrainConfig(model="r_tiny", lr=1, batch_size=np.int64(8), epochs=np.float32(2.0), steps=None)
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.steps) == (1.0, 8, 2.0, None)
    assert type(cfg.lr) is float and type(cfg.batch_size) is int and type(cfg.epochs) is float


@pytest.mark.parametrize(
    "name, text",
    [
        ("run.yaml", f"data: '{DATA}'\nmodel: r_tiny\nlr: 1e-1\nsteps: 1\nstop_after: null\n"),
        ("run.toml", f'data = "{DATA}"\nmodel = "r_tiny"\nlr = 1\nsteps = 1\nmodel_kwargs = {{ embed_dim = 32 }}\n'),
        ("run.json", json.dumps({"data": DATA, "model": "r_tiny", "lr": 0.1, "steps": 1, "margin": None})),
    ],
    ids=["yaml", "toml", "json"],
)
def test_unusual_but_valid_config_files_train(name, text, tmp_path, run_cli):
    config, out = tmp_path / name, tmp_path / "run"
    config.write_text(text)
    argv = ["teacher", "--config", str(config), "--batch-size", "8", "--device", "cpu", "--no-compile"]
    code, _, err = run_cli([*argv, "--out", str(out)])
    assert code == 0, err
    assert (out / "teacher.safetensors").is_file()
