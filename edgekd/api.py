"""The Python API: what the ``edgekd`` commands do, as functions (``from edgekd import distill, load_model, ...``).

Each function runs the same code as its command and takes the same settings, named as the config-file keys (the
long option names with ``_``: ``batch_size``, ``w_th_kd``, ``teacher_model``); values are checked as a config file's
are, and bad input raises ``edgekd.errors.EdgekdError`` with the one line the command would print.

- ``distill(data=..., method=..., teacher=..., out=...)``: ``edgekd distill``; returns its report (``results.json``).
- ``train_teacher(data=..., model=..., out=...)``: ``edgekd teacher``; returns the teacher file's path.
- ``load_model(path)``: an ``Embedder``: a checkpoint ready to embed images.
- ``evaluate(model, pairs)``: verification on a pair set (``synthetic:...`` or an insightface ``.bin``).
- ``export(checkpoint, out, precision=...)``: ``edgekd export`` (ONNX, or ``target="executorch"``); returns the
  written paths and gate reports.

``nproc`` > 1 is the command line's (``edgekd distill --nproc N``): it starts processes.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edgekd.bundle import Bundle, load_bundle
from edgekd.cli import distill as distill_cli
from edgekd.cli import teacher as teacher_cli
from edgekd.cli.distill import run_distill_settings
from edgekd.cli.options import DEMO, check_setting_values, resolve_settings
from edgekd.cli.teacher import TEACHER_DEMO, run_teacher_settings
from edgekd.data import create_pairs
from edgekd.data.pairs import PairSet
from edgekd.data.transforms import normalize
from edgekd.distill.run_report import update_run_report
from edgekd.errors import EdgekdError
from edgekd.eval.report import verify_bundle
from edgekd.export.options import ExportOptions
from edgekd.export.pipeline import ExportResult, export_checkpoint

__all__ = ["distill", "train_teacher", "load_model", "evaluate", "export", "Embedder"]


def _settings(
    command: str, settings: list, demo: dict, given: dict, out, resume: bool, config, log: Callable[[str], None]
) -> tuple[dict, bool]:
    """The command's resolved settings from keyword arguments, as the command line resolves its options; what it
    says (an arcface_torch config file's mapping) goes to ``log``."""
    checked = check_setting_values({**given, "out": str(out)}, settings, f"edgekd.{command}()")
    kwargs = {s.key: None for s in settings} | checked | {"config_file": config, "resume": resume}
    return resolve_settings(command, kwargs, settings, demo, default_out=f"runs/{command}", echo=log)


def distill(
    *,
    out: str | os.PathLike = "runs/distill",
    resume: bool = False,
    config: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    **settings,
) -> dict:
    """Distill a student, as ``edgekd distill`` does (with no ``data``: the built-in demo); returns the report:
    ``student`` (its file), ``teacher``, ``results`` (verification or top-1 of each model) and ``plots``."""
    values, resume = _settings("distill", distill_cli.SETTINGS, DEMO, settings, out, resume, config, log)
    return run_distill_settings(values, resume, log, argv=None)


def train_teacher(
    *,
    out: str | os.PathLike = "runs/teacher",
    resume: bool = False,
    config: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    **settings,
) -> Path | None:
    """Train a teacher, as ``edgekd teacher`` does; returns its ``teacher.safetensors`` (None: stopped early)."""
    values, resume = _settings("teacher", teacher_cli.SETTINGS, TEACHER_DEMO, settings, out, resume, config, log)
    return run_teacher_settings(values, resume, log, argv=None)


class Embedder:
    """A trained model ready to embed images: ``embedder(images)`` takes RGB images, uint8 ``(N, 3, H, W)`` (0-255,
    at the model's input size) and returns float32 ``(N, D)`` embeddings, L2-normalized, computed the way edgekd
    evaluates (the checkpoint's own normalization, eval mode, no gradients). ``bundle`` holds the backbone and head.
    """

    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu") -> None:
        self.bundle, self.device = bundle, torch.device(device)
        self.backbone = bundle.backbone.to(self.device).eval()

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.bundle.cfg.input_size)

    @property
    def embed_dim(self) -> int:
        return int(self.backbone.embed_dim)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != self.input_size:
            raise EdgekdError(
                f"images must be uint8 (N, {', '.join(map(str, self.input_size))}) RGB, got {x.dtype} "
                f"{tuple(x.shape)}; resize to the model's input size and keep 0-255 pixels"
            )
        z = self.backbone(normalize(x.to(self.device), self.bundle.cfg.mean, self.bundle.cfg.std)).float()
        return torch.nn.functional.normalize(z, dim=1).cpu().numpy()


def load_model(path: str | os.PathLike, model: str | None = None, device: str = "cpu") -> Embedder:
    """A checkpoint edgekd wrote (``teacher.safetensors``, ``student.safetensors``), or a plain arcface_torch
    state_dict with its architecture named by ``model`` (``mbf``, ``r50``...), as an ``Embedder`` on ``device``."""
    return Embedder(load_bundle(path, model=model), device)


def evaluate(model: Embedder | str | os.PathLike, pairs: str | PairSet, device: str = "cpu") -> dict:
    """Verification of ``model`` (an ``Embedder`` or a checkpoint path) on ``pairs`` (``synthetic[:k=v,...]``, an
    insightface ``.bin``, or a ``PairSet``), as ``edgekd eval`` reports it: ``accuracy`` (10-fold) with
    ``accuracy_ci``, ``tar_at_far`` and ``tar_ci`` at the FARs the pair set resolves, ``impostor_pairs``."""
    embedder = model if isinstance(model, Embedder) else load_model(model, device=device)
    pair_set = pairs if isinstance(pairs, PairSet) else create_pairs(str(pairs))
    result = verify_bundle(embedder.bundle, pair_set, device=str(embedder.device))
    return {k: v for k, v in result.items() if k != "roc"}


def export(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    model: str | None = None,
    log: Callable[[str], None] = print,
    **options,
) -> ExportResult:
    """Export a checkpoint as ``edgekd export`` does: ONNX (``precision`` fp32/fp16/int8, ``calib=...``), or an
    ExecuTorch program (``target="executorch"``), behind the same gates; returns the written paths and gate reports.
    ``options`` are ``edgekd.export.ExportOptions`` fields (``precision``, ``calib``, ``pairs``, ``static_batch``...);
    ``model`` names the architecture of a plain arcface_torch state_dict. Written into a finished run's folder, the
    export joins that run's report, as with the command."""
    fields = [f.name for f in dataclasses.fields(ExportOptions)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        close = {k: difflib.get_close_matches(k, fields, n=1) for k in unknown}
        hints = "; ".join(f"{k}: did you mean {m[0]}?" if m else f"{k} is no export option" for k, m in close.items())
        raise EdgekdError(f"edgekd.export(): {hints}")
    result = export_checkpoint(checkpoint, out, ExportOptions(**options), model_name=model, log=log)
    update_run_report(result.program or result.onnx, log)  # the report of the run folder it wrote into, if any
    return result
