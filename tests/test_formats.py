"""Issue 23, class 6: every file edgekd writes and reads back carries a format version, and a reader refuses one it
does not read in one line naming the file and both versions (``edgekd.formats``).

Each case takes real files made by the real writers (a tiny ``edgekd teacher`` run stopped after one step, the model
bundle its checkpoint holds, a teacher-embedding cache), changes one file's version, and opens it with the real reader:
``edgekd teacher --out RUN --resume`` for a checkpoint's ``state.json`` and the run's ``settings.json``, ``load_bundle``
for a bundle, ``build_teacher_cache`` for a cache. A refusal is one line naming the file and the versions, and leaves
every file as it was; a file this edgekd reads opens and works.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edgekd.atomic import write_json
from edgekd.bundle import load_bundle, read_bundle_meta, save_bundle
from edgekd.data.synthetic import SyntheticIdentities
from edgekd.distill.pipeline import build_trainee
from edgekd.errors import EdgekdError
from edgekd.formats import FORMAT_KEY, FORMATS
from edgekd.train.checkpoint import STATE_FILE, checkpoint_bundle, write_state
from edgekd.train.config import TrainConfig
from edgekd.train.teacher_cache import TeacherCache, build_teacher_cache, info_path

DATA = "synthetic:identities=8,images_per_identity=4,image_size=16"
RUN_ARGS = ["--data", DATA, "--model", "r_tiny", "--batch-size", "8", "--device", "cpu", "--no-compile"]
FIRST = "checkpoints/step_0000001"
MISSING = object()  # the version field left out, as in files written before formats were versioned


@dataclass
class Made:
    """The originals every case copies: a stopped run, a bundle file, a cache folder and what built the cache."""

    run: Path
    bundle: Path
    cache: Path
    teacher: torch.nn.Module
    dataset: SyntheticIdentities


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Made:
    from edgekd.cli import main

    root = tmp_path_factory.mktemp("formats")
    run = root / "run"
    try:
        main(["teacher", *RUN_ARGS, "--steps", "2", "--stop-after", "1", "--workers", "0", "--out", str(run)])
    except SystemExit as exc:
        assert exc.code in (0, None)
    assert (run / FIRST / STATE_FILE).is_file() and not (run / "teacher.safetensors").exists()
    bundle = root / "bundle" / "teacher.safetensors"
    bundle.parent.mkdir()
    shutil.copy(run / FIRST / "bundle.safetensors", bundle)  # written by save_bundle
    dataset = SyntheticIdentities(identities=4, images_per_identity=2, image_size=16, seed=0)
    teacher = build_trainee(TrainConfig(model="r_tiny", compile=False, device="cpu"), dataset).backbone.eval()
    cache = root / "cache"
    build_teacher_cache(teacher, dataset, teacher.cfg.mean, teacher.cfg.std, cache, torch.device("cpu"))
    return Made(run, bundle, cache, teacher, dataset)


@dataclass
class Files:
    """One case's copies of the originals."""

    run: Path
    bundle: Path
    cache: Path

    def cache_table(self) -> Path:
        (table,) = self.cache.glob("teacher_*.npy")
        return table


@pytest.fixture
def files(made, tmp_path) -> Files:
    shutil.copytree(made.run, tmp_path / "run")
    # The run records its own folder; the copy's says where the copy is, as if the run had been made there (else the
    # resume's rewrite of settings.json, which happens before the checkpoint is read, would change it).
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    settings["settings"]["out"] = str(tmp_path / "run")
    write_json(tmp_path / "run" / "settings.json", settings)
    shutil.copytree(made.bundle.parent, tmp_path / "bundle")
    shutil.copytree(made.cache, tmp_path / "cache")
    return Files(tmp_path / "run", tmp_path / "bundle" / made.bundle.name, tmp_path / "cache")


def _edit_json_file(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _edit_bundle_meta(path: Path, edit) -> None:
    """Rewrite the bundle's ``edgekd`` metadata entry as ``edit`` returns it (a str is written as it is)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(path))
    edited = edit(json.loads(metadata["edgekd"]))
    metadata["edgekd"] = edited if isinstance(edited, str) else json.dumps(edited)
    save_file(tensors, str(path), metadata=metadata)


def _state(f: Files) -> Path:
    return f.run / FIRST / STATE_FILE


def _settings(f: Files) -> Path:
    return f.run / "settings.json"


def _bundle(f: Files) -> Path:
    return f.bundle


def _cache_info(f: Files) -> Path:
    return info_path(f.cache_table())


@dataclass(frozen=True)
class Kind:
    """A kind of file: the reader's name for it, where a case's copy is, and the tree a refusal must leave as it was."""

    name: str
    path: Callable[[Files], Path]
    root: Callable[[Files], Path]

    def edit(self, files: Files, edit) -> None:
        """Replace the file's JSON record (for a bundle: its metadata) by what ``edit`` makes of it."""
        (_edit_bundle_meta if self.name == "bundle" else _edit_json_file)(self.path(files), edit)


KINDS = [
    Kind("checkpoint", _state, lambda f: f.run),
    Kind("settings", _settings, lambda f: f.run),
    Kind("bundle", _bundle, lambda f: f.bundle.parent),
    Kind("teacher_cache", _cache_info, lambda f: f.cache),
]
KIND = {k.name: k for k in KINDS}


def _snapshot(root: Path) -> dict[str, str | None]:
    """Relative path -> sha256 of every file (None for folders) under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgekd: error: "), err
    assert "Traceback" not in err
    return lines[0][len("edgekd: error: ") :]


def _open_cache(made: Made, files: Files) -> TeacherCache:
    """The cache for the module's teacher and data, as training asks for it: opened if present, else built."""
    mean, std = made.teacher.cfg.mean, made.teacher.cfg.std
    return build_teacher_cache(made.teacher, made.dataset, mean, std, files.cache, torch.device("cpu"))


def _open(kind: Kind, files: Files, made: Made, run_cli) -> str | None:
    """Open the kind's file with its real reader; None when it worked, else the one-line refusal."""
    if kind.name in ("checkpoint", "settings"):
        code, _, err = run_cli(["teacher", "--out", str(files.run), "--resume"])
        return None if code == 0 else _one_line(err)
    try:
        if kind.name == "bundle":
            load_bundle(files.bundle)
        else:
            _open_cache(made, files)
    except EdgekdError as exc:
        assert "\n" not in str(exc), str(exc)
        return str(exc)
    return None


def _assert_it_worked(kind: Kind, files: Files, made: Made, written: int) -> None:
    """What a reader that accepted the file did; what it wrote carries version ``written``."""
    if kind.name in ("checkpoint", "settings"):
        assert (files.run / "teacher.safetensors").is_file()  # the resumed run trained its last step
        state = json.loads((files.run / "checkpoints/step_0000002" / STATE_FILE).read_text())
        assert state["step"] == 2
        if kind.name == "checkpoint":
            assert state[FORMAT_KEY] == written
        else:
            assert json.loads((files.run / "settings.json").read_text())[FORMAT_KEY] == written
    elif kind.name == "bundle":
        bundle = load_bundle(files.bundle)
        original = load_file(str(made.bundle))
        loaded = {f"backbone.{k}": v for k, v in bundle.backbone.state_dict().items()}
        loaded |= {f"head.{k}": v for k, v in bundle.head.state_dict().items()}
        assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in original)  # a copy
        resaved = save_bundle(files.bundle.with_name("again.safetensors"), bundle)
        assert read_bundle_meta(resaved)[FORMAT_KEY] == written
    else:
        cache = _open_cache(made, files)
        assert cache.path == files.cache_table()  # the cache was reused, not rebuilt
        assert cache.lookup(torch.tensor([0, 7]), torch.tensor([False, True])).shape == (2, made.teacher.embed_dim)


# (case id, the version the file carries, the (current, oldest) this edgekd is made to have, what happens)
CASES = [
    ("current", 1, None, "works"),
    ("unversioned", MISSING, None, "works"),
    ("older-but-read", 1, (2, 1), "works"),
    ("newer", 2, None, "newer"),
    ("much-newer", 99, None, "newer"),
    ("older-than-read", 1, (3, 2), "older"),
    ("text", "two", None, "garbage"),
    ("number-as-text", "1", None, "garbage"),
    ("negative", -1, None, "garbage"),
    ("zero", 0, None, "garbage"),
    ("null", None, None, "garbage"),
    ("list", [2], None, "garbage"),
    ("boolean", True, None, "garbage"),
    ("fraction", 1.5, None, "garbage"),
]


def _with_version(version):
    def edit(record: dict) -> dict:
        record = {k: v for k, v in record.items() if k != FORMAT_KEY}
        return record if version is MISSING else {**record, FORMAT_KEY: version}

    return edit


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
@pytest.mark.parametrize("version, formats, outcome", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_reader_reads_its_formats_and_refuses_others_in_one_line(
    kind, version, formats, outcome, files, made, run_cli, monkeypatch
):
    kind.edit(files, _with_version(version))
    if formats is not None:
        current, oldest = formats
        monkeypatch.setitem(FORMATS, kind.name, replace(FORMATS[kind.name], current=current, oldest=oldest))
    current, label = FORMATS[kind.name].current, FORMATS[kind.name].label
    before = _snapshot(kind.root(files))

    message = _open(kind, files, made, run_cli)

    if outcome == "works":
        assert message is None
        _assert_it_worked(kind, files, made, written=current)
        return
    assert message is not None, "the reader accepted a version it does not read"
    assert str(kind.path(files)) in message, message
    if outcome == "newer":
        assert f"{label} format {version} is newer than this edgekd reads ({current})" in message, message
        assert "pip install -U edgekd" in message, message
    elif outcome == "older":
        assert f"{label} format {version} is older than this edgekd reads ({oldest} to {current})" in message, message
    else:
        assert f"format version {json.dumps(version)} is not a whole number" in message, message
        assert f"this edgekd reads {current}" in message, message
    assert _snapshot(kind.root(files)) == before  # nothing written, nothing changed


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write(text: str):
    return lambda path: path.write_text(text)


def _json_becomes(edit):
    return lambda path: _edit_json_file(path, edit)


def _meta_becomes(edit):
    return lambda path: _edit_bundle_meta(path, edit)


# (kind, case id, the file damaged and named in the line, what damages it, a fragment the line must hold)
DAMAGED = [
    ("checkpoint", "truncated", _state, _truncate, "not valid JSON"),
    ("checkpoint", "not-json", _state, _write("step 1"), "not valid JSON"),
    ("checkpoint", "a-list", _state, _write("[1]"), "not an edgekd checkpoint file (it holds a list"),
    ("checkpoint", "no-step", _state, _json_becomes(lambda r: {FORMAT_KEY: 1}), "no step count"),
    ("settings", "truncated", _settings, _truncate, "not valid JSON"),
    ("settings", "empty", _settings, _write(""), "not valid JSON"),
    ("settings", "a-string", _settings, _write('"x"'), "not an edgekd run settings file (it holds a string"),
    ("settings", "no-settings", _settings, _json_becomes(lambda r: {"command": "teacher"}), "holds no settings"),
    ("bundle", "not-json", _bundle, _meta_becomes(lambda m: "{model"), "not valid JSON"),
    ("bundle", "no-model", _bundle, _meta_becomes(lambda m: {**m, "model": None}), "names no model"),
    ("bundle", "no-class-count", _bundle, _meta_becomes(lambda m: {**m, "head": {"kind": "arcface"}}), "class count"),
    (
        "bundle",
        "unknown-head-field",
        _bundle,
        _meta_becomes(lambda m: {**m, "head": {**m["head"], "bias": 1}}),
        "fields this edgekd does not know (bias)",
    ),
    (
        "bundle",
        "kwargs-not-object",
        _bundle,
        _meta_becomes(lambda m: {**m, "model_kwargs": [16]}),
        '"model_kwargs" that are not an object',
    ),
    ("teacher_cache", "truncated-info", _cache_info, _truncate, "not valid JSON"),
    ("teacher_cache", "truncated-table", lambda f: f.cache_table(), _truncate, "not a readable teacher-embedding"),
]


@pytest.mark.parametrize("kind, named, damage, fragment", [d[:1] + d[2:] for d in DAMAGED], ids=[
    f"{d[0]}-{d[1]}" for d in DAMAGED
])  # fmt: skip
def test_a_damaged_file_is_one_line_naming_it_and_is_left_as_it_was(
    kind, named, damage, fragment, files, made, run_cli
):
    kind = KIND[kind]
    damage(named(files))
    before = _snapshot(kind.root(files))
    message = _open(kind, files, made, run_cli)
    assert message is not None and fragment in message and str(named(files)) in message, message
    assert _snapshot(kind.root(files)) == before


def test_a_run_from_before_formats_were_versioned_resumes_and_is_then_stamped(files, run_cli):
    """Every file of a run written before this change (no version anywhere) reads as format 1."""
    for path in (files.run / "settings.json", *files.run.glob(f"checkpoints/*/{STATE_FILE}")):
        _edit_json_file(path, _with_version(MISSING))
    for bundle in files.run.glob("checkpoints/*/bundle.safetensors"):
        _edit_bundle_meta(bundle, _with_version(MISSING))
    code, _, err = run_cli(["teacher", "--out", str(files.run), "--resume"])
    assert code == 0, err
    assert read_bundle_meta(files.run / "teacher.safetensors")[FORMAT_KEY] == FORMATS["bundle"].current
    assert json.loads((files.run / "settings.json").read_text())[FORMAT_KEY] == FORMATS["settings"].current


@pytest.mark.parametrize("version", [2, "two"], ids=["newer", "garbage"])
def test_deleting_a_refused_cache_as_the_line_says_builds_it_again(version, files, made):
    """The line says to delete the file it names: a table left without its info file is of no known format, so it is
    built again, not read (an edgekd from before formats wrote the info second; a kill between left a table alone)."""
    info = info_path(files.cache_table())
    _edit_json_file(info, _with_version(version))
    with pytest.raises(EdgekdError, match="delete it and this edgekd builds the cache again|delete it and edgekd"):
        _open_cache(made, files)
    info.unlink()
    files.cache_table().write_bytes(b"a table of another format")
    cache = _open_cache(made, files)
    assert cache.info[FORMAT_KEY] == FORMATS["teacher_cache"].current
    assert cache.lookup(torch.tensor([0]), torch.tensor([True])).shape == (1, made.teacher.embed_dim)


def test_the_command_line_shows_a_newer_bundle_in_one_line_and_writes_nothing(files, run_cli, tmp_path):
    _edit_bundle_meta(files.bundle, _with_version(FORMATS["bundle"].current + 1))
    out = tmp_path / "eval"
    code, _, err = run_cli(["eval", str(files.bundle), "--pairs", "synthetic", "--device", "cpu", "--out", str(out)])
    line = _one_line(err)
    assert code == 2 and str(files.bundle) in line and "model bundle format 2 is newer" in line, line
    assert not out.exists()


@pytest.fixture
def dcp_checkpoint(made, tmp_path) -> tuple[Path, dict]:
    """A multi-rank run's checkpoint folder: DCP's files, saved here in one process, and the ``state.json`` record that
    ``ShardedTrainee.save`` writes beside them (step, world size, the bundle's metadata)."""
    import torch.distributed.checkpoint as dcp

    from edgekd.bundle import bundle_meta
    from edgekd.train.dcp_checkpoint import checkpoint_state, model_state, named_trainable

    trainee = build_trainee(TrainConfig(model="r_tiny", compile=False, device="cpu"), made.dataset)
    folder = tmp_path / "step_0000001"
    state, _ = checkpoint_state(model_state(trainee), named_trainable(trainee), None, 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)  # one process, as meant
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder, {"step": 1, "format": "dcp", "world_size": 2, "bundle": bundle_meta(trainee)}


# (case id, how the state.json record changes, a fragment of the refusal or None where it loads)
DCP_CASES = [
    ("stamped", lambda r: r, None),
    ("unversioned", _with_version(MISSING), None),
    ("newer-checkpoint", _with_version(2), "checkpoint format 2 is newer than this edgekd reads (1)"),
    ("newer-bundle", lambda r: {**r, "bundle": _with_version(3)(r["bundle"])}, "model bundle format 3 is newer"),
    ("bundle-without-model", lambda r: {**r, "bundle": {**r["bundle"], "model": None}}, "names no model"),
]


@pytest.mark.parametrize("edit, fragment", [c[1:] for c in DCP_CASES], ids=[c[0] for c in DCP_CASES])
def test_a_multi_rank_checkpoint_is_read_only_in_a_format_this_edgekd_reads(edit, fragment, dcp_checkpoint):
    folder, record = dcp_checkpoint
    write_state(folder, record)
    _edit_json_file(folder / STATE_FILE, edit)
    if fragment is None:
        assert checkpoint_bundle(folder).head.num_classes == record["bundle"]["head"]["num_classes"]
        return
    with pytest.raises(EdgekdError) as refused:
        checkpoint_bundle(folder)
    assert fragment in str(refused.value) and str(folder / STATE_FILE) in str(refused.value)


# ----------------------------------------------------------------------------------------- export and calibration


@pytest.mark.parametrize("version", [2, "two", None])
def test_a_plan_sidecar_of_another_format_is_refused_in_one_line(version, tmp_path, run_cli):
    """benchmark-latency reads a TensorRT plan's input shape from its sidecar before any TensorRT call."""
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"engine bytes")
    (tmp_path / "m.plan.json").write_text(json.dumps({"format_version": version, "input_shape": [3, 16, 16]}))
    code, _, err = run_cli(
        ["benchmark-latency", str(plan), "--backend", "tensorrt", "--json", str(tmp_path / "l.json")]
    )
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "export sidecar format" in lines[0] and "m.plan.json" in lines[0], err
    assert not (tmp_path / "l.json").exists()


@pytest.mark.parametrize("version", [2, "two", "missing"])
def test_a_calibration_cache_entry_of_another_format_is_calibrated_again(version, tmp_path):
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

    from edgekd.calib.cache import CalibrationCache

    cache = CalibrationCache(tmp_path)
    data = TensorsData(CalibrationMethod.MinMax, {"x": TensorData(lowest=np.float32(-1), highest=np.float32(1))})
    path = cache.store("k", data, {"images": 4})
    meta = tmp_path / "k.meta.json"
    assert json.loads(meta.read_text())["format_version"] == FORMATS["calibration_cache"].current
    assert cache.lookup("k") == path
    if version == "missing":
        meta.unlink()
    else:
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "format_version": version}))
    assert cache.lookup("k") is None and not path.exists() and not meta.exists()
