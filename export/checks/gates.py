"""Accuracy gates for exported artifacts: per-row embedding parity against PyTorch FP32, and a task gate on pairs.

Parity: the candidate runs every gate input at several batch sizes; each row's cosine to the FP32 PyTorch embedding of
the same image is compared with a threshold on the statistic that precision is judged by (``THRESHOLDS``, read from
``edgekd.export.passes.precisions``: ``min`` for FP32/FP16, ``mean`` for INT8). The max absolute error (raw and after
L2 normalization) and how far a row's embedding moves between batch sizes are reported beside it.

Task: verification accuracy (10-fold) and TAR@FAR on held-out pairs, through ``edgekd.eval.embed.evaluate_pairs``, for
the FP32 reference and the candidate; the candidate may lose at most ``max_drop`` points on each. Each distinct image
of the pairs is embedded once per model, with its mirror (``GATE_FLIP``), and the reference's metrics can be measured
once (``task_metrics``) and reused for every artifact of an export.

A failed gate raises ``GateFailed``; the caller prints ``report.format()`` first and writes nothing final.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from edgekd.errors import GateFailed
from edgekd.eval.embed import Forward, embed_batches, evaluate_pairs
from edgekd.export.passes.precisions import PRECISION_TABLE

__all__ = [
    "THRESHOLDS",
    "DEFAULT_GATE_BATCHES",
    "DEFAULT_MAX_DROP",
    "ParityRow",
    "TaskResult",
    "GateReport",
    "cosine_rows",
    "run_batched",
    "parity_gate",
    "task_metrics",
    "task_gate",
]

# gate -> (statistic, minimum per-row cosine): each precision's own under its name, and under ``trt-<name>`` that of its
# TensorRT engines where it differs (``Precision.engine_gate``).
THRESHOLDS: dict[str, tuple[str, float]] = {
    **{p.name: (p.statistic, p.min_cosine) for p in PRECISION_TABLE.values()},
    **{
        p.engine_gate: (p.statistic, p.engine_min_cosine)
        for p in PRECISION_TABLE.values()
        if p.engine_min_cosine is not None
    },
}
DEFAULT_GATE_BATCHES = (1, 8, 32)
DEFAULT_MAX_DROP = 0.5  # points (percent) of accuracy and of TAR@FAR
GATE_FARS = (1e-3, 1e-2)  # the FARs at which the task gate compares TAR
# The task gate flip-sums, as verification does (SPEC §5). One view would halve its forwards, but it is a stricter gate,
# not a cheaper one: the INT8 quantization error that a flip-sum averages out cost the export tests' trained student
# 0.37 (ONNX) and 0.63 (ExecuTorch) points of accuracy on one view against 0.03 and -0.10 flip-summed, each
# +-0.13 (paired bootstrap); BENCHMARKS.md, "INT8 export: the task gate's cost".
GATE_FLIP = True


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of ``a: (N, D)`` and ``b: (N, D)`` in float64 -> ``(N,)``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-30)


def run_batched(forward: Forward, x: torch.Tensor, batch: int) -> np.ndarray:
    """``forward`` over normalized ``x: (N, C, H, W)`` in chunks of ``batch`` (the last chunk may be smaller) ->
    float32 ``(N, D)``, through ``edgekd.eval.embed.embed_batches``."""
    return np.concatenate(list(embed_batches(forward, x.split(batch))))


def _l2n(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-30)


@dataclass
class ParityRow:
    """Parity of one input source at one batch size."""

    source: str
    batch: int
    n: int
    min_cos: float
    p1_cos: float
    mean_cos: float
    max_abs: float
    max_abs_normalized: float
    batch_drift: float  # max |candidate row at this batch - same row at batch 1|, 0 for batch 1
    passed: bool


@dataclass
class TaskResult:
    """Verification metrics of reference and candidate on held-out pairs, in points (percent)."""

    pairs: str
    reference: dict[str, float]
    candidate: dict[str, float]
    drop: dict[str, float]
    max_drop: float
    passed: bool
    n_pairs: int = 0
    flip: bool = True  # whether the embeddings were flip-summed (as every gate before this field existed did)

    def noise_points(self, key: str) -> float:
        """One standard error of metric ``key`` at this pair count, in points: sqrt(p (1 - p) / n) for a rate p over
        the n pairs it counts (all pairs for accuracy, the genuine half for a TAR). The drop compares both models on
        the same pairs, so it is less noisy than this; a drop within it is not evidence of a worse model."""
        n = self.n_pairs if key == "accuracy" else max(1, self.n_pairs // 2)
        p = min(max(self.reference[key] / 100.0, 0.0), 1.0)
        return 100.0 * (p * (1.0 - p) / max(n, 1)) ** 0.5


# What to try when a gate fails, by precision: the options that change what the gate measures.
_ADVICE = {
    "int8": "try --calib-method (percentile, minmax, entropy), more --calib-images, or keep layers in float with "
    "--keep-first N / --keep-last N",
    "fp16": "keep this model in FP32 (--precision fp32), or --min-cosine if the drift is acceptable",
}


@dataclass
class GateReport:
    """Everything the gates measured for one artifact."""

    artifact: str
    precision: str
    statistic: str
    threshold: float
    rows: list[ParityRow] = field(default_factory=list)
    task: TaskResult | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form (goes into the artifact's sidecar JSON)."""
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def format(self) -> str:
        """A short human-readable table of the parity rows and the task gate."""
        parity = all(r.passed for r in self.rows)
        head = (
            f"gate for {self.artifact} [{self.precision}]: per-row cosine {self.statistic} >= {self.threshold}"
            f" -> {'PASS' if parity else 'FAIL'}"  # this gate's own verdict; the task gate's is on its line
        )
        cols = (
            f"  {'source':<10} {'batch':>5} {'n':>5} {'min cos':>10} {'p1 cos':>10} {'mean cos':>10} "
            f"{'max|d|':>9} {'max|d| l2n':>10} {'drift':>9}"
        )
        lines = [head, cols]
        for r in self.rows:
            lines.append(
                f"  {r.source:<10} {r.batch:>5} {r.n:>5} {r.min_cos:>10.7f} {r.p1_cos:>10.7f} {r.mean_cos:>10.7f} "
                f"{r.max_abs:>9.2e} {r.max_abs_normalized:>10.2e} {r.batch_drift:>9.2e}" + ("" if r.passed else "  <-")
            )
        if self.task is not None:
            t = self.task
            views = "flip-summed" if t.flip else "one view"
            lines.append(
                f"  task gate on {t.pairs}, {t.n_pairs} pairs, {views} (max drop {t.max_drop} points): "
                f"{'PASS' if t.passed else 'FAIL'}"
            )
            head = ("metric", "reference (%)", "candidate (%)", "drop (points)", "noise (±1 se)")
            lines.append(f"    {head[0]:<16} " + " ".join(f"{h:>13}" for h in head[1:]))
            for key in t.reference:
                lines.append(
                    f"    {key:<16} {t.reference[key]:>13.2f} {t.candidate[key]:>13.2f} {t.drop[key]:>+13.2f} "
                    f"{t.noise_points(key):>13.2f}"
                )
        for failure in self.failures:
            lines.append(f"  FAILED: {failure}")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Raise ``GateFailed`` with a one-line summary when any gate failed: which gate, by how much, how noisy the
        task gate is at its pair count, and what to try."""
        if not self.failures:
            return
        notes = []
        if self.task is not None and not self.task.passed:
            t = self.task
            failed = [k for k, d in t.drop.items() if d > t.max_drop]
            noise = ", ".join(f"{k} ±{t.noise_points(k):.2f}" for k in failed)
            notes.append(f"task-gate noise at {t.n_pairs} pairs (one standard error): {noise}; --max-drop sets the "
                         f"allowed drop (now {t.max_drop:g})")  # fmt: skip
        advice = _ADVICE.get(self.precision)
        if advice:
            notes.append(advice)
        tail = f" ({'; '.join(notes)})" if notes else ""
        raise GateFailed(f"{self.artifact} failed its {self.precision} gate: {'; '.join(self.failures)}{tail}")


def parity_gate(
    reference: Forward,
    candidate: Forward,
    inputs: Mapping[str, torch.Tensor],
    *,
    precision: str,
    artifact: str,
    batch_sizes: Sequence[int] = DEFAULT_GATE_BATCHES,
    threshold: float | None = None,
    statistic: str | None = None,
) -> GateReport:
    """Compare ``candidate`` with ``reference`` on every input source at every batch size.

    Args:
        reference: the FP32 PyTorch model (normalized ``(B, C, H, W)`` -> ``(B, D)``).
        candidate: the artifact's runtime, same contract.
        inputs: source name -> normalized float32 images ``(N, C, H, W)`` (e.g. ``generated``, ``real``).
        precision: a key of ``THRESHOLDS``; picks the default statistic and threshold.
        artifact: name shown in the report.
        batch_sizes: batch sizes to run the candidate at (1 is always added: drift is measured against it).
        threshold: override the minimum cosine.
        statistic: override the statistic, ``min`` or ``mean``.

    Returns:
        The report; check ``report.passed`` or call ``report.raise_if_failed()``.
    """
    stat, thr = THRESHOLDS[precision]
    stat = statistic or stat
    thr = threshold if threshold is not None else thr
    report = GateReport(artifact=artifact, precision=precision, statistic=stat, threshold=thr)
    batches = sorted({1, *batch_sizes})
    for source, x in inputs.items():
        ref = run_batched(reference, x, max(batches))
        single = None
        for batch in batches:
            out = run_batched(candidate, x, batch)
            if single is None:
                single = out
            cos = cosine_rows(ref, out)
            finite = bool(np.isfinite(out).all())
            value = float(cos.min() if stat == "min" else cos.mean()) if finite else float("nan")
            passed = finite and value >= thr
            report.rows.append(
                ParityRow(
                    source=source,
                    batch=batch,
                    n=len(x),
                    min_cos=float(cos.min()),
                    p1_cos=float(np.percentile(cos, 1)),
                    mean_cos=float(cos.mean()),
                    max_abs=float(np.abs(ref - out).max()),
                    max_abs_normalized=float(np.abs(_l2n(ref) - _l2n(out)).max()),
                    batch_drift=float(np.abs(out - single).max()),
                    passed=passed,
                )
            )
            if not finite:
                report.failures.append(f"{source} batch {batch}: non-finite embeddings")
            elif not passed:
                report.failures.append(f"{source} batch {batch}: {stat} cosine {value:.6f} < {thr}")
    return report


def task_metrics(
    forward: Forward,
    pairs,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    fars: Sequence[float] = GATE_FARS,
    batch_size: int = 64,
    flip: bool = GATE_FLIP,
) -> dict[str, float]:
    """Verification accuracy and TAR at each of ``fars`` of ``forward`` on ``pairs``, in points (percent): one pass
    over each distinct image of the pairs (``evaluate_pairs``), with its mirror only when ``flip``."""
    result = evaluate_pairs(
        forward, pairs, mean=mean, std=std, batch_size=batch_size, flip=flip, device="cpu", fars=fars
    )
    out = {"accuracy": 100.0 * float(result["accuracy"])}
    for far, tar in result["tar_at_far"].items():
        out[f"tar@far={float(far):g}"] = 100.0 * float(tar)
    return out


def task_gate(
    report: GateReport,
    reference: Forward,
    candidate: Forward,
    pairs,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    max_drop: float = DEFAULT_MAX_DROP,
    fars: Sequence[float] = GATE_FARS,
    batch_size: int = 64,
    flip: bool = GATE_FLIP,
    reference_metrics: Mapping[str, float] | None = None,
) -> GateReport:
    """Add the task gate to ``report``: accuracy and TAR@FAR of ``candidate`` within ``max_drop`` points of
    ``reference`` on ``pairs`` (an ``edgekd.data`` PairSet).

    Args:
        reference_metrics: ``task_metrics`` of ``reference`` on these pairs with the same ``fars``, ``flip`` and
            normalization, when already measured (another artifact of the same export); ``reference`` is not run then.

    Returns:
        ``report``, with ``task`` set and a failure appended when a metric dropped too far.
    """
    measure = dict(mean=mean, std=std, fars=fars, batch_size=batch_size, flip=flip)
    ref = dict(reference_metrics) if reference_metrics is not None else task_metrics(reference, pairs, **measure)
    cand = task_metrics(candidate, pairs, **measure)
    drop = {k: ref[k] - cand[k] for k in ref}
    bad = [f"{k} dropped {d:.2f} points" for k, d in drop.items() if d > max_drop]
    report.task = TaskResult(
        pairs=getattr(pairs, "name", "pairs"),
        reference=ref,
        candidate=cand,
        drop=drop,
        max_drop=max_drop,
        passed=not bad,
        n_pairs=len(pairs),
        flip=flip,
    )
    report.failures.extend(f"task gate: {b} (> {max_drop})" for b in bad)
    return report
