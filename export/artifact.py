"""The gated-write job that every artifact of ``edgekd export`` goes through: the ONNX file, the TensorRT plan and the
torch-tensorrt program alike.

``write_gated`` writes the artifact under a temporary name in its target folder, gates it from there, and renames it
into place only when every gate passes; then it writes the sidecar ``<artifact>.json`` (kind, precision, what the
route adds, the gate report and the environment). A failure leaves nothing final behind and raises ``GateFailed`` after
the report has been logged.

``Gates`` is what every artifact of one export is gated against: the FP32 PyTorch reference, the gate images
(``gate_inputs``) and the task-gate pairs (``load_gate_pairs``); the gates themselves live in
``edgekd.export.checks.gates``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgekd.atomic import atomic_path, write_json
from edgekd.calib.dataset import build_calibration_set
from edgekd.data import create_dataset, create_pairs
from edgekd.data.pairs import PairSet
from edgekd.data.transforms import normalize
from edgekd.errors import EdgekdError
from edgekd.eval.embed import Forward
from edgekd.export.checks.gates import GateReport, parity_gate, task_gate, task_metrics
from edgekd.formats import stamp
from edgekd.utils.env import environment

__all__ = ["DEFAULT_GATE_PAIRS", "Gates", "Artifact", "gate_inputs", "load_gate_pairs", "log_skipped", "write_gated"]

DEFAULT_GATE_PAIRS = 3000
MIN_IMPOSTORS_AT_FAR = 20
Log = Callable[[str], None]


def gate_inputs(
    cfg,
    count: int,
    seed: int,
    real: str | None,
    with_noise: bool,
    generated: str = "synthetic",
    skip_bad: bool = False,
    log: Log | None = None,
) -> dict[str, torch.Tensor]:
    """Normalized gate images: ``count`` generated faces (held-out identities of the ``generated`` synthetic spec),
    uniform noise (FP32/FP16 only: parity must hold for any input), and ``real`` images (a folder or data spec; with
    ``skip_bad`` unreadable ones are left out, and ``log`` hears how many)."""
    c, h, w = cfg.input_size
    if h != w:
        raise EdgekdError(f"gates need a square input size, the model takes {h}x{w}")
    faces = create_dataset(
        generated, split="heldout", identities=count, images_per_identity=1, image_size=h, channels=c, seed=seed
    )
    batch = torch.stack([faces[i][0] for i in range(len(faces))])
    inputs = {"synthetic": normalize(batch, cfg.mean, cfg.std)}
    if with_noise:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randint(0, 256, (max(8, count // 2), c, h, w), generator=gen, dtype=torch.uint8)
        inputs["noise"] = normalize(noise, cfg.mean, cfg.std)
    if real:
        real_set = build_calibration_set(real, cfg, num_images=count, seed=seed + 1, skip_bad=skip_bad)
        log_skipped(real_set.skipped, f"gate images {real}", log or (lambda _msg: None))
        inputs["real"] = torch.from_numpy(real_set.images)
    return inputs


def log_skipped(skipped: list[str], source: str, log: Log, shown: int = 3) -> None:
    """How many images of ``source`` were left out as unreadable (``--skip-bad``), and the first few of them."""
    if not skipped:
        return
    log(f"{source}: skipped {len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''}")
    for problem in skipped[:shown]:
        log(f"  {problem}")
    if len(skipped) > shown:
        log(f"  ... and {len(skipped) - shown} more")


def load_gate_pairs(spec: str | None, cfg, seed: int) -> PairSet | None:
    """The task-gate pairs: ``synthetic[:k=v,...]`` (held-out identities at the model's input size,
    ``DEFAULT_GATE_PAIRS`` pairs unless the spec says otherwise) or an insightface ``.bin`` file; None for no task
    gate."""
    if spec is None:
        return None
    c, h, _ = cfg.input_size
    if spec == "builtin":
        spec = "synthetic"
    if spec.startswith("synthetic"):
        return create_pairs(spec, pairs=DEFAULT_GATE_PAIRS, image_size=h, channels=c, seed=seed)
    return create_pairs(spec)


def _resolve_fars(pairs: PairSet) -> tuple[float, ...]:
    """FARs the pair set resolves: at least ``MIN_IMPOSTORS_AT_FAR`` impostor pairs above the threshold (fewer make
    TAR an order statistic of a handful of pairs, which moves by points under harmless perturbations)."""
    impostors = len(pairs) - pairs.num_genuine
    fars = tuple(f for f in (1e-4, 1e-3, 1e-2, 1e-1) if f * impostors >= MIN_IMPOSTORS_AT_FAR)
    return fars or (1e-1,)


@dataclass
class Gates:
    """What every artifact of one export is gated against.

    Attributes:
        reference: the FP32 PyTorch model (normalized ``(B, C, H, W)`` -> ``(B, D)``).
        inputs: source name -> normalized gate images ``(N, C, H, W)`` (``gate_inputs``).
        pairs: task-gate pairs (``load_gate_pairs``); None runs the parity gate alone.
        mean: the model's normalization mean (the task gate normalizes the pairs' images).
        std: the model's normalization std.
        batches: batch sizes the parity gate runs the candidate at.
        min_cosine: overrides the precision's cosine threshold.
        max_drop: largest allowed drop of accuracy and TAR@FAR, in points.
        log: receives the gate reports and the written paths.
    """

    reference: Forward
    inputs: Mapping[str, torch.Tensor]
    pairs: PairSet | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batches: tuple[int, ...]
    min_cosine: float | None
    max_drop: float
    log: Log
    # the reference's task metrics, the same for every artifact of the export: measured by the first task gate
    reference_task: dict[str, float] | None = field(default=None, init=False, repr=False)

    def run(
        self, candidate: Forward, precision: str, artifact: str, batches: tuple[int, ...] | None = None
    ) -> GateReport:
        """The parity gate of ``candidate`` (at ``batches``, default ``self.batches``) under ``precision``'s
        threshold, plus the task gate when there are pairs; logs the report and returns it."""
        report = parity_gate(
            self.reference,
            candidate,
            self.inputs,
            precision=precision,
            artifact=artifact,
            batch_sizes=batches or self.batches,
            threshold=self.min_cosine,
        )
        if self.pairs is not None:
            fars = _resolve_fars(self.pairs)
            pairs, mean, std = self.pairs, self.mean, self.std
            if self.reference_task is None:
                self.reference_task = task_metrics(self.reference, pairs, mean, std, fars=fars)
            task_gate(
                report,
                self.reference,
                candidate,
                pairs,
                mean,
                std,
                max_drop=self.max_drop,
                fars=fars,
                reference_metrics=self.reference_task,
            )
        self.log(report.format())
        return report


@dataclass
class Artifact:
    """A written artifact: its path, its sidecar JSON and the gate report behind it."""

    path: Path
    sidecar: Path
    gate: GateReport


def write_gated(
    path: str | os.PathLike,
    write: Callable[[Path], Any],
    candidate: Callable[[Path], Forward],
    gates: Gates,
    *,
    kind: str,
    precision: str,
    sidecar: dict[str, Any],
    gate_as: str | None = None,
    gate_batches: tuple[int, ...] | None = None,
) -> Artifact:
    """Write, gate, rename into place, describe: the job every export route shares (see the module docstring).

    Args:
        path: where the artifact ends up.
        write: writes the artifact to the path it is given (a temporary name in ``path``'s folder).
        candidate: what the gates run, given that temporary path (a runtime on the file as written).
        gates: what the candidate is gated against.
        kind: the sidecar's ``kind`` (``onnx``, ``tensorrt-plan``, ``torch-tensorrt-exported-program``).
        precision: the artifact's precision, recorded in the sidecar.
        sidecar: what the route adds to the sidecar JSON.
        gate_as: the ``THRESHOLDS`` key the parity gate judges by (default: ``precision``).
        gate_batches: the batch sizes to gate at (default: ``gates.batches``).

    Returns:
        The final path, the sidecar's path and the gate report.

    Raises:
        GateFailed: a gate failed; the report was logged and nothing final was written.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        write(tmp)
        report = gates.run(candidate(tmp), gate_as or precision, path.name, gate_batches)
        report.raise_if_failed()
    meta = path.with_name(path.name + ".json")
    write_json(
        meta,
        stamp(
            "export_sidecar",
            {
                "artifact": path.name,
                "kind": kind,
                "precision": precision,
                **sidecar,
                "gate": report.to_dict(),
                "environment": environment(),
            },
        ),
    )
    gates.log(f"wrote {path} and {meta.name}")
    return Artifact(path=path, sidecar=meta, gate=report)
