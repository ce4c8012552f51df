"""Exact-resume checkpoints: trainable weights, optimizer state, RNG and the data position, written atomically.

Layout: ``<run>/checkpoints/step_0000200/`` with ``bundle.safetensors`` (the trainee: backbone and
head), ``optimizer.safetensors`` (optimizer tensors plus the RNG state) and ``state.json`` (step,
config, optimizer param groups, and an fp16 run's loss scaler: ``edgekd.train.precision``). A checkpoint is
written into a hidden temporary folder and renamed into place, and an old one is hidden before it is deleted, so a
killed run never leaves a half-written or half-deleted checkpoint in view; ``latest_checkpoint`` only sees complete
folders. What a killed run leaves under hidden names is removed by ``remove_run_debris`` when the next run on that
folder starts.

``state.json`` carries the checkpoint's format version (``edgekd.formats``, stamped by ``write_state``); every reader
goes through ``read_state``, which refuses a format this edgekd does not read before anything is loaded.

A multi-rank run (torchrun) writes the same folders with torch.distributed.checkpoint's files instead of the two
safetensors files (``edgekd.train.dcp_checkpoint``, written by ``edgekd.train.sharded``); ``load_checkpoint`` and
``checkpoint_bundle`` read both kinds in one process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgekd.atomic import TEMP_FILE, TRASH, discard_tree, file_mode, make_temp_dir, remove_debris
from edgekd.bundle import Bundle, bundle_from_meta, checked_bundle_meta, load_bundle, load_bundle_tensors, save_bundle
from edgekd.errors import CheckpointError
from edgekd.formats import FORMATS, read_versioned_json, stamp
from edgekd.train.dcp_checkpoint import DCP_METADATA, is_dcp_checkpoint, load_full

STATE_FILE = "state.json"
CHECKPOINT_FILES = ("bundle.safetensors", "optimizer.safetensors", STATE_FILE)
DCP_CHECKPOINT_FILES = (DCP_METADATA, STATE_FILE)  # a multi-rank run's (edgekd.train.dcp_checkpoint)
CHECKPOINT_NAME = re.compile(r"step_(\d{7,})")
# The folder a checkpoint is written in before its rename: ".step_0000200." plus mkdtemp's 8 random characters.
TEMP_CHECKPOINT = re.compile(r"\.step_\d{7,}\.[a-z0-9_]{8}")


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: dict) -> None:
    entries: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, index, key = name.split(".", 2)
            entries.setdefault(int(index), {})[key] = value
    for name, value in saved["scalars"].items():
        index, key = name.split(".", 1)
        entries.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": entries, "param_groups": saved["param_groups"]})


def save_checkpoint(
    run_dir: Path, step: int, bundle: Bundle, optimizer: torch.optim.Optimizer, extra: dict, keep: int = 2
) -> Path:
    """Write the checkpoint after ``step`` completed steps; keep the newest ``keep`` checkpoints."""
    final = checkpoint_path(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(final.parent, prefix=f".{final.name}.")
    try:
        _write_checkpoint(tmp, step, bundle, optimizer, extra)
        if final.exists():
            discard_tree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    for old in checkpoint_folders(run_dir)[:-keep]:
        discard_tree(old)
    return final


def _write_checkpoint(folder: Path, step: int, bundle: Bundle, optimizer: torch.optim.Optimizer, extra: dict) -> None:
    save_bundle(folder / "bundle.safetensors", bundle)
    tensors, optim_json = _optimizer_tensors(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(folder / "optimizer.safetensors"))
    os.chmod(folder / "optimizer.safetensors", file_mode())  # safetensors creates its files 0600
    write_state(folder, {"step": step, "optimizer": optim_json, **extra})


def write_state(folder: Path, state: dict) -> None:
    """Write ``state`` as the checkpoint's ``state.json`` in ``folder``, stamped with this edgekd's checkpoint format.

    Not atomic by itself: ``folder`` is a checkpoint's temporary folder, renamed into place once complete.
    """
    (Path(folder) / STATE_FILE).write_text(json.dumps(stamp("checkpoint", state), indent=2))


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint after ``step`` completed steps lives (whether or not it exists)."""
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The run's ``step_*`` checkpoint folders, oldest first (by step number, not by name)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_NAME.fullmatch(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    done = [
        p
        for p in checkpoint_folders(run_dir)
        if any(all((p / name).is_file() for name in files) for files in (CHECKPOINT_FILES, DCP_CHECKPOINT_FILES))
    ]
    return done[-1] if done else None


def remove_run_debris(run_dir: Path) -> list[Path]:
    """Delete what a killed run left in ``run_dir``: checkpoint folders it was writing or deleting and files it
    was writing atomically. Only one process trains in a run folder, so anything under those names is dead."""
    run_dir, root = Path(run_dir), Path(run_dir) / "checkpoints"
    return [
        *remove_debris(run_dir, TEMP_FILE),
        *remove_debris(root, TEMP_CHECKPOINT),
        *remove_debris(root, TRASH),
        *remove_debris(root, TEMP_FILE),
    ]


def read_state(path: Path) -> dict:
    """The ``state.json`` (step, config, ...) of the checkpoint folder ``path``; a one-line CheckpointError when it is
    unreadable, of a format this edgekd does not read, or without a step."""
    file = Path(path) / STATE_FILE
    state = read_versioned_json("checkpoint", file)
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(
            f"{file}: no step count (step is {json.dumps(step)}); the file is damaged: {FORMATS['checkpoint'].damaged}"
        )
    return state


def load_checkpoint(path: Path, bundle: Bundle, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer and RNG from ``path`` into live objects; returns the saved state dict.

    A multi-rank run's checkpoint loads too: its head shards are joined into the full head (resuming in one process).
    """
    state = read_state(path)  # first: a checkpoint this edgekd cannot read is refused before anything is loaded
    if is_dcp_checkpoint(path):
        load_full(path, bundle, optimizer)
        return state
    try:
        weights = load_file(str(path / "bundle.safetensors"))
        tensors = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    load_bundle_tensors(bundle, weights, str(path))
    try:
        _restore_optimizer(optimizer, tensors, state["optimizer"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit this run ({exc})") from None
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


def checkpoint_bundle(path: str | Path) -> Bundle:
    """The trained model a checkpoint folder holds, as one process's ``Bundle`` (for eval or export).

    Either kind: a one-process checkpoint's ``bundle.safetensors``, or a multi-rank run's DCP files, whose head
    shards are joined into the full head (the modules are rebuilt from the metadata its rank 0 wrote).
    """
    path = Path(path)
    state = read_state(path)  # the checkpoint's format, checked for either kind
    if not is_dcp_checkpoint(path):
        return load_bundle(path / "bundle.safetensors")
    meta = state.get("bundle")
    if meta is None:
        raise CheckpointError(f"checkpoint {path} does not say which model it holds (no bundle in {STATE_FILE})")
    bundle = bundle_from_meta(checked_bundle_meta(meta, path / STATE_FILE))
    load_full(path, bundle)
    bundle.backbone.eval()
    return bundle
