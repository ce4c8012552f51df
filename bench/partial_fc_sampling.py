"""Partial FC sampling (``--sample-rate``): what it buys per training step at C = 1 M and 2 M identities.

One step of the head, as ``fit`` runs it for the default face distillation (TH-KD ``paper``: ce, kd, th_ce, th_kd
through the student's trainable head and the teacher's frozen one, ArcFace s = 64, m = 0.5): draw the rows
(``ClassSampler``), gather them from both heads (``index_select``), the shared-head loss forward and backward
(``chunked`` on a CPU, ``triton`` on CUDA), the student head's gradient scattered back into its ``(C, D)`` tensor.
Each rate's steps use different step numbers (new draws), the rates interleaved round by round in a rotated order
so that a shared machine's drift hits every rate alike; a row's time is the median over its steps (CUDA events on
a GPU, ``perf_counter`` on a CPU). The SGD update of the head (momentum and weight decay over all C rows, the same
at every rate) is timed apart: it is what sampling does not shrink.

    python -m bench.partial_fc_sampling --write-md                      # CPU: C = 1 M, 2 M; rates 1.0, 0.3, 0.1
    python -m bench.partial_fc_sampling --device cuda --B 512 --write-md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import textwrap
import time
from datetime import date
from pathlib import Path

import torch

from bench.markdown_section import merge_section
from bench.shared_head_loss import environment
from edgekd.distill.methods import method_weights
from edgekd.heads import HeadSpec
from edgekd.heads.class_sampling import ClassSampler
from edgekd.losses import shared_head_loss

HEADING = "## Partial FC sampling: the head's step at 1 M and 2 M identities (issue 25)"
RATES = (1.0, 0.3, 0.1)


def _timer(device: torch.device):
    """``time(fn) -> ms`` for one call: CUDA events on a GPU, perf_counter on a CPU."""
    if device.type == "cuda":

        def cuda_ms(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)

        return cuda_ms

    def cpu_ms(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)

    return cpu_ms


class HeadStep:
    """Both heads of ``C`` classes and a batch; ``step(rate, k)`` runs step ``k`` of the head at ``rate``."""

    def __init__(self, B: int, D: int, C: int, device: torch.device, dtype: torch.dtype, backend: str) -> None:
        g = torch.Generator(device).manual_seed(0)
        rand = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
        self.W_s = rand(C, D).requires_grad_()
        self.W_t = rand(C, D)
        self.z = rand(B, D).requires_grad_()
        self.z_t = rand(B, D)
        self.labels = torch.randint(0, C, (B,), generator=g, device=device)
        self.C, self.backend = C, backend
        self.head = HeadSpec("arcface", 64.0, 0.5)
        self.weights = method_weights("th-kd", None, face=True)
        self.samplers = {rate: ClassSampler(rate, seed=0) for rate in RATES}

    def step(self, rate: float, k: int) -> int:
        """One forward+backward at ``rate``; returns the rows computed."""
        self.W_s.grad = self.z.grad = None
        rows = self.samplers[rate].rows(k, self.labels, 0, self.C)
        total, _ = shared_head_loss(self.z, self.labels, W_s=self.W_s, W_t=self.W_t, z_t=self.z_t, head=self.head,
                                    weights=self.weights, backend=self.backend, rows=rows)  # fmt: skip
        total.backward()
        return self.C if rows is None else rows.numel()

    def sgd_update(self, momentum: torch.Tensor) -> None:
        """The optimizer's work on the head: SGD with momentum and weight decay over every row (torch.optim's
        single-tensor form of it)."""
        with torch.no_grad():
            grad = self.W_s.grad.add(self.W_s, alpha=5e-4)
            momentum.mul_(0.9).add_(grad)
            self.W_s.add_(momentum, alpha=-0.1)


def measure(C: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    dtype = torch.float32
    backend = "triton" if device.type == "cuda" else "chunked"
    head, time_ms = HeadStep(args.B, args.D, C, device, dtype, backend), _timer(device)
    times: dict[float, list[float]] = {rate: [] for rate in RATES}
    drawn: dict[float, int] = {}
    for rate in RATES:  # warm-up: allocations, kernel compiles
        drawn[rate] = head.step(rate, 0)
    for r in range(args.rounds):
        order = RATES[r % len(RATES) :] + RATES[: r % len(RATES)]
        for rate in order:
            for k in range(1 + r * args.runs, 1 + (r + 1) * args.runs):  # step 0 was the warm-up's
                times[rate].append(time_ms(lambda rate=rate, k=k: head.step(rate, k)))
    momentum = torch.zeros_like(head.W_s)
    sgd = statistics.median(time_ms(lambda: head.sgd_update(momentum)) for _ in range(3))
    full = statistics.median(times[1.0])
    rows = []
    for rate in RATES:
        ms = statistics.median(times[rate])
        rows.append({"C": C, "rate": rate, "rows": drawn[rate], "ms": ms, "speedup": full / ms, "sgd_ms": sgd,
                     "steps": len(times[rate]), "backend": backend})  # fmt: skip
    return rows


def table_lines(rows: list[dict]) -> list[str]:
    lines = [
        "| C | sample rate | rows computed | head loss fwd+bwd, ms (median) | speed-up vs 1.0 "
        "| SGD update of the head, ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['C']:,} | {row['rate']} | {row['rows']:,} | {row['ms']:.0f} | {row['speedup']:.2f}× | "
                     f"{row['sgd_ms']:.0f} |")  # fmt: skip
    return lines


def write_markdown(path: Path, rows: list[dict], args: argparse.Namespace, device: torch.device, load: str) -> None:
    method = (
        f"`python -m bench.partial_fc_sampling {' '.join(args.argv)}`, {date.today().isoformat()}, "
        f"{environment(device)}; {load}. B = {args.B} rows, D = {args.D}, float32, TH-KD `paper` terms (ce, kd, "
        f"th_ce, th_kd) through a trainable student head and a frozen teacher head, ArcFace s = 64, m = 0.5, "
        f"backend `{rows[0]['backend']}`; {args.rounds} rounds × {args.runs} steps per rate, rates interleaved. A step "
        "here is the head's part of a training step: the draw, the gather of both heads' drawn rows, the loss "
        "forward and backward, the gradient scattered into the full (C, D) student head. The last column, the SGD "
        "update of all C rows, is the same at every rate and is not in the step time."
    )
    note = (
        "The step shrinks less than the rate: the draw (a random key per class), the gather of both heads' drawn "
        "rows and the student head's gradient, a dense (C, D) tensor written by the gather's backward, cost the "
        "same or scale with C at every rate, and the SGD update (last column) does not shrink at all, as in Partial "
        'FC. GPU rows: `make gpu-check` runs this script in its loss stage at 1 M and 2 M (section "Partial FC '
        'sampling" of its report). Sampling also changes the objective (a softmax over the drawn classes; SPEC §4, '
        "`--sample-rate` in the README): a rate is a speed/accuracy trade measured by the run's own verification, "
        "not a free speed-up."
    )
    lines = [HEADING, "", *textwrap.wrap(method, 118), "", *table_lines(rows), "", *textwrap.wrap(note, 118)]
    merge_section(path, HEADING, lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--B", type=int, default=128, help="global batch (edgekd's default)")
    parser.add_argument("--D", type=int, default=512, help="embedding width (MobileFaceNet's)")
    parser.add_argument("--C", type=int, nargs="+", default=[1_000_000, 2_000_000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1, help="steps per rate and round")
    parser.add_argument("--write-md", action="store_true", help="merge the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    load_before = os.getloadavg()[0]
    rows = []
    for C in args.C:
        rows += measure(C, args, device)
        for row in rows[-len(RATES) :]:
            print(f"C {row['C']:>9,} rate {row['rate']:<4} rows {row['rows']:>9,} {row['ms']:9.0f} ms "
                  f"x{row['speedup']:.2f}  (SGD update {row['sgd_ms']:.0f} ms)", flush=True)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()
    load = f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (2 = both cores busy)"
    print(load)
    if args.write_md:
        write_markdown(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", rows, args, device, load)
    return rows


if __name__ == "__main__":
    main()
