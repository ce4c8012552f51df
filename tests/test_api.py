"""The Python API (``from edgekd import distill, train_teacher, load_model, evaluate``): the same runs as the
commands, the same checks on its arguments, embeddings that match the backbone computed by hand, and an evaluation
equal to ``edgekd eval``'s."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import edgekd
from edgekd.errors import EdgekdError

DATA = "synthetic:identities=8,images_per_identity=4,image_size=16"
PAIRS = "synthetic:identities=8,images_per_identity=4,image_size=16,pairs=40,pair_identities=8"
TINY = {"model": "r_tiny", "batch_size": 8, "steps": 2, "device": "cpu", "compile": False}


def test_import_edgekd_stays_light():
    code = "import sys, edgekd; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    from edgekd import distill, evaluate, load_model, train_teacher

    assert all(callable(f) for f in (distill, evaluate, load_model, train_teacher))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    teacher = edgekd.train_teacher(data=DATA, out=root / "teacher", log=lambda _: None, **TINY)
    report = edgekd.distill(
        data=DATA, method="th-kd", teacher=str(teacher), pairs=PAIRS, out=root / "run", log=lambda _: None, **TINY
    )
    return root, teacher, report


def test_train_teacher_and_distill_run_as_the_commands_do(runs):
    root, teacher, report = runs
    assert teacher == root / "teacher" / "teacher.safetensors" and teacher.is_file()
    assert (root / "teacher" / "settings.json").is_file()  # a run folder like the command's: it resumes the same way
    assert report["method"] == "th-kd" and (root / "run" / "student" / "student.safetensors").is_file()
    saved = json.loads((root / "run" / "results.json").read_text())
    assert saved["student"] == report["student"]


def test_load_model_embeds_as_the_backbone_does_by_hand(runs):
    root, _, report = runs
    embedder = edgekd.load_model(report["student"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, *embedder.input_size), dtype=np.uint8)
    got = embedder(images)
    cfg = embedder.bundle.cfg
    x = (torch.from_numpy(images).float() / 255 - torch.tensor(cfg.mean).view(1, -1, 1, 1)) / torch.tensor(
        cfg.std
    ).view(1, -1, 1, 1)
    with torch.no_grad():
        z = embedder.bundle.backbone(x).double()
    want = (z / z.norm(dim=1, keepdim=True)).numpy()
    assert got.shape == (5, embedder.embed_dim) and got.dtype == np.float32
    # float32 forward of the same module on the same input: equal up to the final float32 rounding of unit vectors
    assert np.abs(got - want).max() < 1e-6
    with pytest.raises(EdgekdError, match="uint8"):
        embedder(images.astype(np.float32))


def test_evaluate_equals_edgekd_eval(runs, run_cli, tmp_path):
    _, _, report = runs
    result = edgekd.evaluate(report["student"], PAIRS)
    code, _, err = run_cli(["eval", report["student"], "--pairs", PAIRS, "--out", str(tmp_path / "eval")])
    assert code in (0, None), err
    cli = json.loads((tmp_path / "eval" / "eval.json").read_text())
    accuracies = [v for v in _find(cli, "accuracy")]
    assert result["accuracy"] in accuracies and result["impostor_pairs"] == 20


def _find(tree, key):
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                yield v
            yield from _find(v, key)
    elif isinstance(tree, list):
        for v in tree:
            yield from _find(v, key)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"lrr": 0.1}, "did you mean lr?"),
        ({"lr": float("nan")}, "lr is nan"),
        ({"steps": 2.5}, "steps is a decimal number"),
        ({"nproc": 2}, "nproc > 1 starts processes from the command line"),
    ],
)
def test_bad_arguments_raise_the_commands_one_line_error(kwargs, fragment, tmp_path):
    with pytest.raises(EdgekdError, match=fragment.replace("?", r"\?")):
        edgekd.distill(data=DATA, out=tmp_path / "x", log=lambda _: None, **{**TINY, **kwargs})
    assert not (tmp_path / "x").exists()


def test_export_writes_the_gated_onnx_as_the_command_does(runs, tmp_path):
    from edgekd import export

    _, _, report = runs
    result = export(report["student"], tmp_path / "student.onnx", pairs=PAIRS, log=lambda _: None)
    assert result.onnx == tmp_path / "student.onnx" and result.onnx.is_file()
    assert json.loads((tmp_path / "student.onnx.json").read_text())["precision"] == "fp32"
    with pytest.raises(EdgekdError, match=r"precison: did you mean precision\?"):
        export(report["student"], tmp_path / "x.onnx", precison="int8", log=lambda _: None)


def test_an_arcface_config_mapping_is_said_through_log(tmp_path, capsys):
    """An arcface_torch config given to the API: its mapping lines go to ``log``, not to stdout."""
    config = tmp_path / "ms1m_tiny.py"
    config.write_text("from easydict import EasyDict as edict\nconfig = edict()\nconfig.lr = 0.05\nconfig.seed = 7\n")
    said = []
    tiny = {k: v for k, v in TINY.items() if k != "steps"} | {"steps": 1}
    edgekd.train_teacher(data=DATA, out=tmp_path / "teacher", config=config, log=said.append, **tiny)
    assert "arcface_torch lr=0.05 -> --lr 0.05" in "\n".join(said), said
    assert "arcface_torch " not in capsys.readouterr().out


def test_an_export_into_a_run_folder_joins_its_report(runs):
    """As with the command: an export written into a finished run's folder rewrites that run's report."""
    root, _, report = runs
    said = []
    result = edgekd.export(report["student"], pairs=PAIRS, log=said.append)
    assert result.onnx.parent == root / "run" / "student"
    assert f"run report updated: {root / 'run' / 'report.html'}" in said
    assert result.onnx.name in (root / "run" / "report.md").read_text()
