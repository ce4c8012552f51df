"""arcface_torch's habits carry over (issue 25, "Their names"): ``--embedding-size``, ``--warmup-epochs``,
``--margin-list``, a ``--batch-size`` that says it is the global batch, and arcface_torch config files (``.py``, read
and never run, or YAML/JSON with its keys) loading as edgekd's settings with a line per key saying what it became."""

import json
import textwrap

import pytest
import torch
from PIL import Image
from torch import nn

from edgekd.bundle import load_bundle
from edgekd.cli.distill import SETTINGS as DISTILL_SETTINGS
from edgekd.cli.distill import command as distill_command
from edgekd.cli.options import DEMO, resolve_settings
from edgekd.cli.teacher import SETTINGS as TEACHER_SETTINGS
from edgekd.cli.teacher import TEACHER_DEMO
from edgekd.cli.teacher import command as teacher_command
from edgekd.data import create_dataset, create_pairs
from edgekd.data.recordio import pack_image_folder
from edgekd.data.synthetic import SyntheticIdentities
from edgekd.data.verification_bin import write_bin
from edgekd.errors import EdgekdError
from edgekd.models import _registry
from edgekd.models._builder import build_model
from edgekd.train.config import TrainConfig
from edgekd.train.loop import warmup_steps_of

DATA = "synthetic:identities=8,images_per_identity=8,image_size=32"
FAST = ["--batch-size", "16", "--device", "cpu", "--no-compile", "--workers", "0"]

# arcface_torch's configs/ms1mv3_r50.py as it ships, with base.py's optimizer and a wandb key; rec is set per test.
MS1MV3_R50 = """\
from easydict import EasyDict as edict

# make training faster
# our RAM is 256G
# mount -t tmpfs -o size=140G  tmpfs /train_tmp

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.dali = False
config.optimizer = "sgd"
config.wandb_key = "0123456789abcdef"

config.rec = {rec!r}
config.num_classes = {classes}
config.num_image = 5179510
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', "agedb_30"]
"""


def resolved(command, argv, out, echo=None):
    """The settings `edgekd COMMAND ARGV` runs with (its own parsing, layering and checks; nothing trained), and
    the lines it prints while resolving them."""
    settings, demo = (TEACHER_SETTINGS, TEACHER_DEMO) if command is teacher_command else (DISTILL_SETTINGS, DEMO)
    kwargs = dict(command.make_context(command.name, [*argv, "--out", str(out)]).params)
    lines = []
    values, _ = resolve_settings(command.name, kwargs, settings, demo, default_out=str(out), echo=lines.append)
    return values, lines


@pytest.fixture
def recordio(tmp_path):
    """A packed RecordIO folder: 4 identities x 10 images at 32 px, lfw.bin and cfp_fp.bin beside train.rec."""
    faces = SyntheticIdentities(identities=4, images_per_identity=10, image_size=32, seed=3)
    for i in range(len(faces)):
        image, label = faces[i]
        (tmp_path / "faces" / f"id{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "faces" / f"id{label}" / f"{i:02d}.png")
    folder = tmp_path / "ms1m-mini"
    pack_image_folder(tmp_path / "faces", folder)
    for seed, name in enumerate(("lfw", "cfp_fp")):
        pairs = create_pairs(f"synthetic:pairs=20,pair_identities=6,pair_images=4,image_size=32,seed={seed}")
        images = torch.stack([pairs.images[i] for i in range(len(pairs.images))])
        write_bin(folder / f"{name}.bin", images, pairs.issame)
    return folder


def ms1mv3_config(path, rec, classes=93431):
    path.write_text(MS1MV3_R50.format(rec=str(rec), classes=classes))
    return path


# --- --embedding-size ---------------------------------------------------------------------------------------------


def test_embedding_size_is_the_backbone_width_and_a_resumed_run_keeps_it(tmp_path, run_cli, one_line):
    out = tmp_path / "teacher"
    argv = ["teacher", "--data", DATA, "--model", "r_tiny", "--embedding-size", "48", "--steps", "2", *FAST]
    code, _, err = run_cli([*argv, "--stop-after", "1", "--out", str(out)])
    assert code == 0, err
    saved = json.loads((out / "settings.json").read_text())["settings"]
    assert saved["embedding_size"] == 48 and saved["model_kwargs"] == {"embed_dim": 48}

    code, _, err = run_cli(["teacher", "--out", str(out), "--resume", "--embedding-size", "64"])
    one_line(code, err, "--embedding-size was 48", "is 64 now")
    code, _, err = run_cli(["teacher", "--out", str(out), "--resume"])
    assert code == 0, err
    teacher = load_bundle(out / "teacher.safetensors")
    assert teacher.backbone.embed_dim == 48 and teacher.head.embed_dim == 48  # r_tiny's own width is 128
    assert teacher.backbone.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 48)


def test_embedding_size_and_another_model_kwargs_embed_dim_is_one_line(tmp_path, run_cli, one_line):
    argv = ["teacher", "--data", DATA, "--model", "r_tiny", "--embedding-size", "48", *FAST, "--out", str(tmp_path)]
    code, _, err = run_cli([*argv, "--model-kwargs", '{"embed_dim": 64}'])
    one_line(code, err, "--embedding-size 48", "embed_dim 64", "disagree")
    values, _ = resolved(
        teacher_command, [*argv[1:-2], "--model-kwargs", '{"embed_dim": 48, "dropout": 0.1}'], tmp_path
    )
    assert values["model_kwargs"] == {"embed_dim": 48, "dropout": 0.1}


class FixedWidth(nn.Module):
    """A backbone whose width is fixed: it takes no embed_dim."""

    def __init__(self, input_size: int = 32) -> None:
        super().__init__()
        self.input_size, self.embed_dim = (3, input_size, input_size), 16
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)


def test_embedding_size_for_a_model_without_one_is_one_line_naming_it(tmp_path, run_cli, one_line, monkeypatch):
    def fixed_width(**kwargs):
        return build_model(FixedWidth, "fixed_width", kwargs, mean=(0.5,), std=(0.5,))

    monkeypatch.setitem(_registry._model_entrypoints, "fixed_width", fixed_width)
    argv = ["teacher", "--data", DATA, "--model", "fixed_width", "--steps", "1", *FAST, "--out", str(tmp_path / "r")]
    code, _, err = run_cli([*argv, "--embedding-size", "64"])
    one_line(code, err, "--embedding-size 64", "'fixed_width'", "embed_dim")
    assert not (tmp_path / "r").exists()


def test_a_student_width_the_teacher_cannot_share_its_head_with_stops_distill_before_training(
    tmp_path, run_cli, one_line
):
    """SPEC §3: the teacher-head and l2e terms read the student's embedding with the teacher's head."""
    code, _, err = run_cli(["teacher", "--data", DATA, "--model", "r_tiny", "--steps", "1", *FAST,
                            "--out", str(tmp_path / "t")])  # fmt: skip
    assert code == 0, err
    student = ["distill", "--data", DATA, "--model", "mbf_tiny", "--embedding-size", "64", "--method", "th-kd",
               "--steps", "1", *FAST]  # fmt: skip
    out = tmp_path / "run"
    code, stdout, err = run_cli([*student, "--teacher", str(tmp_path / "t" / "teacher.safetensors"), "--out", str(out)])
    one_line(code, err, "embed_dim 64", "128")
    assert not out.exists()
    # A teacher trained here has its model's own width (r_tiny: 128): refused before that teacher trains.
    code, stdout, err = run_cli([*student, "--teacher-model", "r_tiny", "--out", str(out)])
    one_line(code, err, "embed_dim 64", "128", "--teacher-model r_tiny", "--embedding-size 128")
    assert "teacher:" not in stdout and not out.exists()


# --- warm-up in epochs --------------------------------------------------------------------------------------------


def test_warmup_epochs_give_the_schedule_of_that_many_epochs_of_steps(tmp_path, run_cli):
    out = tmp_path / "teacher"
    code, _, err = run_cli(["teacher", "--data", DATA, "--model", "r_tiny", "--warmup-epochs", "1.5", "--epochs", "3",
                            "--lr", "0.1", "--log-every", "1", *FAST, "--out", str(out)])  # fmt: skip
    assert code == 0, err
    steps_per_epoch = len(create_dataset(DATA, split="train")) // 16
    warm, total = 1.5 * steps_per_epoch, 3 * steps_per_epoch
    assert warm == int(warm) and warm > 2  # the test's sizes: a whole number of warm-up steps, several of them
    # arcface_torch's PolyScheduler: linear warm-up to the peak over the warm-up steps, then linear decay to 0.
    expected = [0.1 * (t + 1) / warm if t < warm else 0.1 * (1 - (t - warm) / (total - warm)) for t in range(total)]
    logged = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(expected, rel=1e-9)


def test_warmup_epochs_round_up_to_whole_steps():
    cfg = TrainConfig(model="r_tiny", warmup_epochs=0.3, warmup_steps=0)
    assert warmup_steps_of(cfg, steps_per_epoch=4) == 2  # 1.2 steps
    assert warmup_steps_of(TrainConfig(model="r_tiny", warmup_steps=7), steps_per_epoch=4) == 7


def test_warmup_in_steps_and_in_epochs_together_is_one_line_and_the_command_line_wins(tmp_path, run_cli, one_line):
    argv = ["teacher", "--data", DATA, "--model", "r_tiny", *FAST, "--out", str(tmp_path / "r")]
    code, _, err = run_cli([*argv, "--warmup-steps", "5", "--warmup-epochs", "1"])
    one_line(code, err, "--warmup-steps 5", "--warmup-epochs 1", "give one")
    config = tmp_path / "run.yaml"
    config.write_text("warmup_steps: 5\nwarmup_epochs: 1\n")
    code, _, err = run_cli([*argv, "--config", str(config)])
    one_line(code, err, "--warmup-steps 5", "config file")

    config.write_text("warmup_steps: 5\n")
    values, _ = resolved(teacher_command, [*argv[1:-2], "--config", str(config), "--warmup-epochs", "2"], tmp_path)
    assert (values["warmup_epochs"], values["warmup_steps"]) == (2.0, 0)
    # The demo's 20 warm-up steps give way to a warm-up asked for in epochs.
    values, _ = resolved(teacher_command, ["--warmup-epochs", "0.5"], tmp_path / "demo")
    assert (values["warmup_epochs"], values["warmup_steps"]) == (0.5, 0)


# --- --batch-size is the global batch -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["teacher", "distill"])
def test_batch_size_help_says_global_and_how_to_convert_a_per_gpu_batch(command, run_cli):
    code, stdout, _ = run_cli([command, "--help"])
    assert code == 0
    text = " ".join(stdout.split())
    assert (
        "--batch-size INTEGER RANGE images per step: the global batch over all processes (arcface_torch's batch_size "
        "is per GPU: multiply by the GPU count)" in text
    )


# --- --margin-list ------------------------------------------------------------------------------------------------

MARGINS = [("1,0.5,0", "arcface", 0.5), ("1.0,0.0,0.35", "cosface", 0.35), ("1,0,0", "cosine", 0.0)]


@pytest.mark.parametrize("margins, head, margin", MARGINS)
def test_margin_list_names_the_head_and_margin(margins, head, margin, tmp_path):
    values, _ = resolved(teacher_command, ["--data", DATA, "--margin-list", margins], tmp_path)
    assert (values["head"], values["margin"]) == (head, margin) and values["margin_list"] is None


@pytest.mark.parametrize("margins", ["0.9,0.4,0.15", "1,0.3,0.2", "1.35,0,0", "1,-0.1,0"])
def test_a_combined_margin_is_one_line_naming_the_values(margins, tmp_path, run_cli, one_line):
    code, _, err = run_cli(["teacher", "--data", DATA, "--margin-list", margins, *FAST, "--out", str(tmp_path)])
    shown = ", ".join(f"{float(m):g}" for m in margins.split(","))
    one_line(code, err, f"({shown})", "ArcFace", "CosFace", "not supported")


def test_margin_list_with_head_or_margin_is_one_line(tmp_path, run_cli, one_line):
    code, _, err = run_cli(["teacher", "--margin-list", "1,0.5,0", "--margin", "0.3", "--out", str(tmp_path)])
    one_line(code, err, "--margin-list", "--margin")


# --- arcface_torch config files -----------------------------------------------------------------------------------


def test_arcface_torch_python_config_loads_with_a_line_per_key(recordio, tmp_path):
    config = ms1mv3_config(tmp_path / "ms1mv3_r50.py", recordio)
    values, lines = resolved(distill_command, ["--config", str(config)], tmp_path / "run")
    expected = {
        "model": "r50", "model_kwargs": {"embed_dim": 512}, "embedding_size": 512, "head": "arcface", "margin": 0.5,
        "sample_rate": 1.0, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128, "lr": 0.1, "epochs": 20.0,
        "warmup_epochs": 0.0, "warmup_steps": 0, "data": str(recordio), "pairs": None, "eval_every": 2000,
        "amp": "fp16",
    }  # fmt: skip
    assert {key: values[key] for key in expected} == expected
    assert lines[0] == f"--config {config}: arcface_torch's keys as edgekd's options"
    notes = [line.strip() for line in lines[1:]]
    assert len(notes) == 21  # one per key of the file
    for note in [
        "arcface_torch margin_list=(1.0, 0.5, 0.0) -> --head arcface --margin 0.5",
        "arcface_torch network=r50 -> --model r50",
        "arcface_torch batch_size=128 -> --batch-size 128 (arcface_torch's is per GPU, edgekd's the global batch: "
        "128 x 1 process)",
        f"arcface_torch rec={recordio} -> --data {recordio}",
        "arcface_torch num_epoch=20 -> --epochs 20",
        "arcface_torch warmup_epoch=0 -> --warmup-epochs 0",
        "arcface_torch verbose=2000 -> --eval-every 2000",
        "arcface_torch dali=False: ignored (edgekd reads RecordIO with its own loader)",
        "arcface_torch num_image=5179510: ignored (edgekd counts the images of --data)",
        "arcface_torch num_classes=93431: ignored (edgekd takes the class count from --data)",
        "arcface_torch wandb_key=<hidden>: ignored (no wandb in edgekd: it logs to OUT/metrics.jsonl)",
        "arcface_torch fp16=True -> --amp fp16",
    ]:
        assert note in notes, "\n".join(notes)
    assert "0123456789abcdef" not in "\n".join(lines)  # a wandb key is a secret
    (val,) = [n for n in notes if n.startswith("arcface_torch val_targets=")]
    assert "every .bin beside --data" in val and "agedb_30 not beside --data" in val


def test_a_per_gpu_batch_becomes_the_global_batch_of_the_processes(recordio, tmp_path, monkeypatch):
    config = ms1mv3_config(tmp_path / "ms1mv3_r50.py", recordio)
    values, lines = resolved(distill_command, ["--config", str(config), "--nproc", "2"], tmp_path / "run")
    assert values["batch_size"] == 256
    assert lines == []  # the process that starts the ranks is silent: their rank 0 says it
    # A rank torchrun started: its world decides.
    for name, value in {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(name, value)
    values, lines = resolved(distill_command, ["--config", str(config)], tmp_path / "run")
    assert values["batch_size"] == 512
    assert "  arcface_torch batch_size=128 -> --batch-size 512 (arcface_torch's is per GPU, edgekd's the global " \
           "batch: 128 x 4 processes)" in lines  # fmt: skip
    monkeypatch.setenv("RANK", "1")
    assert resolved(distill_command, ["--config", str(config)], tmp_path / "run")[1] == []
    # An edgekd config file's batch_size is the global batch, as the option is.
    plain = tmp_path / "run.yaml"
    plain.write_text("batch_size: 128\n")
    assert resolved(distill_command, ["--config", str(plain)], tmp_path / "run")[0]["batch_size"] == 128


@pytest.mark.parametrize("name", ["run.yaml", "run.json"])
def test_yaml_and_json_files_with_arcface_torch_keys_load_alike(name, recordio, tmp_path):
    keys = {"network": "r_tiny", "rec": str(recordio), "batch_size": 8, "num_epoch": 2, "warmup_epoch": 0.5,
            "margin_list": [1.0, 0.0, 0.4], "embedding_size": 64, "num_workers": 0, "frequent": 5, "seed": 7,
            "val_targets": ["cfp_fp"], "output": str(tmp_path / "out")}  # fmt: skip
    config = tmp_path / name
    config.write_text(json.dumps(keys))  # JSON is YAML too
    values, lines = resolved(distill_command, ["--config", str(config)], tmp_path / "default-out")
    expected = {"model": "r_tiny", "data": str(recordio), "batch_size": 8, "epochs": 2.0, "warmup_epochs": 0.5,
                "head": "cosface", "margin": 0.4, "model_kwargs": {"embed_dim": 64}, "num_workers": 0, "log_every": 5,
                "seed": 7, "pairs": str(recordio / "cfp_fp.bin")}  # fmt: skip
    assert {key: values[key] for key in expected} == expected
    assert "  arcface_torch num_workers=0 -> --workers 0" in lines
    assert "  arcface_torch frequent=5 -> --log-every 5" in lines


def test_a_python_config_trains_the_run_it_describes(recordio, tmp_path, run_cli):
    config = tmp_path / "mini.py"
    config.write_text(
        textwrap.dedent(f"""\
        from easydict import EasyDict as edict
        config = edict()
        config.margin_list = (1.0, 0.0, 0.4)
        config.network = "r_tiny"
        config.embedding_size = 64
        config.batch_size = 8
        config.lr = 0.05
        config.rec = "{recordio}"
        config.num_classes = 4
        config.num_epoch = 1
        config.warmup_epoch = 0.4
        config.seed = 5
        config.output = "{tmp_path / "run"}"
        """)
    )
    (recordio / "property").write_text("4,32,32")  # insightface's classes,height,width
    code, stdout, err = run_cli(["teacher", "--config", str(config), "--device", "cpu", "--no-compile",
                                 "--log-every", "1"])  # fmt: skip
    assert code == 0, err
    assert f"arcface_torch num_classes=4: checked: {recordio / 'property'} says 4 too" in stdout
    saved = json.loads((tmp_path / "run" / "settings.json").read_text())["settings"]
    assert (saved["head"], saved["margin"], saved["batch_size"], saved["seed"]) == ("cosface", 0.4, 8, 5)
    teacher = load_bundle(tmp_path / "run" / "teacher.safetensors")
    assert (teacher.head.spec.kind, teacher.head.spec.m, teacher.backbone.embed_dim) == ("cosface", 0.4, 64)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 40 // 8  # one epoch
    assert logged[:4] == pytest.approx([0.025, 0.05, 0.05, 0.05 * (1 - 1 / 3)])  # 0.4 x 5 = 2 warm-up steps


@pytest.mark.parametrize(
    "line, fragments",
    [
        ("config.network = 'vit_t'", ["network=vit_t", "no such backbone", "r50", "mbf"]),
        ("config.margin_list = (0.9, 0.4, 0.15)", ["(0.9, 0.4, 0.15)", "ArcFace", "CosFace", "not supported"]),
        ("config.optimizer = 'adamw'", ["optimizer=adamw", "SGD only"]),
        ("config.gradient_acc = 2", ["gradient_acc=2", "no gradient accumulation"]),
        (
            "config.interclass_filtering_threshold = 0.4",
            ["interclass_filtering_threshold=0.4", "no inter-class filtering"],
        ),
        ("config.lr = 0.1 * 2", ["line 3", "config.lr = 0.1 * 2 is computed", "does not run the file"]),
        ("import os; config.rec = os.path.join('a', 'b')", ["line 3", "is computed"]),
        ("print('hello')", ["line 3", "only `config.KEY = value` lines", "does not run the file"]),
        ("config.lrr = 0.1", ["unknown key lrr; did you mean lr?"]),
        ("config.batch_size = '128'", ["batch_size is a string ('128')"]),
        ("config.num_classes = 5", ["num_classes=5", "property says 4"]),
        ("config.network = 'r_tiny'\nconfig.model = 'r50'", ["network (arcface_torch's name) and model", "keep one"]),
    ],
)
def test_what_edgekd_cannot_follow_in_an_arcface_torch_config_is_one_line(
    line, fragments, recordio, tmp_path, run_cli, one_line
):
    (recordio / "property").write_text("4,32,32")
    config = tmp_path / "bad.py"
    config.write_text(f"from easydict import EasyDict as edict\nconfig = edict()\n{line}\nconfig.rec = '{recordio}'\n")
    out = tmp_path / "run"
    code, _, err = run_cli(["teacher", "--config", str(config), "--out", str(out)])
    one_line(code, err, *fragments)
    assert not out.exists()


def test_a_python_config_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "evil.py"
    config.write_text(f"config = dict()\nconfig.lr = __import__('pathlib').Path({str(marker)!r}).touch()\n")
    with pytest.raises(EdgekdError, match="is computed, and edgekd does not run the file"):
        resolved(teacher_command, ["--config", str(config)], tmp_path / "run")
    assert not marker.exists()
