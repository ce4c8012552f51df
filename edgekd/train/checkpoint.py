"""Exact-resume checkpoints: trainable weights, optimizer state, RNG and the data position, written atomically.

Layout: ``<run>/checkpoints/step_0000200/`` with ``bundle.safetensors`` (the trainee: backbone, head,
projection), ``optimizer.safetensors`` (optimizer tensors plus the RNG state) and ``state.json`` (step,
config, optimizer param groups). A checkpoint is written into a temporary folder and renamed into place,
so a killed run never leaves a half-written one; ``latest_checkpoint`` only sees complete folders.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgekd.bundle import Bundle, load_bundle_tensors, save_bundle
from edgekd.errors import CheckpointError

STATE_FILE = "state.json"


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
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:07d}.", dir=root))
    try:
        save_bundle(tmp / "bundle.safetensors", bundle)
        tensors, optim_json = _optimizer_tensors(optimizer)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "optimizer": optim_json, **extra}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(path: Path, bundle: Bundle, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer and RNG from ``path`` into live objects; returns the saved state dict."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
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
