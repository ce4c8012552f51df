"""Verification during training, arcface_torch's ``CallBackVerification``: every ``--eval-every`` steps the backbone
is scored on the run's verification pair sets (10-fold accuracy, flip-summed embeddings, as ``edgekd eval``), the
scores go to ``metrics.jsonl`` beside the loss, and the backbone of the best mean accuracy so far is kept as
``best.safetensors`` (``best.json``: its step and scores), so a run that overfits late still leaves its best model.

Rank 0 alone evaluates (the others wait for it at their next collective). The best file holds the backbone without a
head: what verification measured and what an export needs; a class-sharded head is in the checkpoints.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import torch

from edgekd.atomic import write_json
from edgekd.bundle import Bundle, save_bundle
from edgekd.data.pairs import PairSet
from edgekd.eval.report import verify_bundle

__all__ = ["VerifyDuringTraining", "BEST_FILE", "BEST_RECORD"]

BEST_FILE = "best.safetensors"
BEST_RECORD = "best.json"


class VerifyDuringTraining:
    """Scores the trainee's backbone on ``pair_sets`` every ``every`` steps; see the module doc."""

    def __init__(self, pair_sets: list[PairSet], every: int, run_dir: Path, device: torch.device) -> None:
        self.pair_sets, self.every, self.run_dir, self.device = pair_sets, int(every), Path(run_dir), device
        record = self.run_dir / BEST_RECORD
        self.best = json.loads(record.read_text())["mean_accuracy"] if record.is_file() else -math.inf

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def __call__(self, step: int, trainee: Bundle) -> dict[str, float]:
        """Score, log and keep the best; returns ``{set name: accuracy}`` and ``mean``."""
        backbone = trainee.backbone
        was_training = backbone.training
        backbone.eval()
        try:
            # edgekd eval's own path (verify_bundle): the logged score is what evaluating the kept file gives.
            scores = {
                pairs.name: float(verify_bundle(trainee, pairs, str(self.device))["accuracy"])
                for pairs in self.pair_sets
            }
        finally:
            backbone.train(was_training)
        mean = sum(scores.values()) / len(scores)
        line = {"step": step, "time": datetime.now(UTC).isoformat(timespec="seconds"), "verify": scores,
                "verify_mean": mean}  # fmt: skip
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if mean > self.best:
            self.best = mean
            save_bundle(self.run_dir / BEST_FILE, Bundle(backbone=backbone, meta={"role": "best", "step": step}))
            write_json(self.run_dir / BEST_RECORD, {"step": step, "mean_accuracy": mean, "accuracy": scores})
        return {**scores, "mean": mean}
