"""CPU/GPU training throughput of the distillation step: eager vs torch.compile, live teacher vs teacher cache.

Runs the real training loop (``edgekd.train.loop.fit``) for a few steps per configuration on built-in synthetic
identities and reports the median images/s over the steps after warm-up (compile time excluded).

    python bench/train_step.py --model mbf --teacher r18 --batch-size 64 --image-size 112 --steps 8 --warmup 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from edgekd.data.synthetic import SyntheticIdentities
from edgekd.distill.pipeline import build_trainee
from edgekd.losses import LossWeights
from edgekd.train.config import TrainConfig
from edgekd.train.loop import TeacherSignal, fit
from edgekd.train.teacher_cache import build_teacher_cache


def measure(cfg: TrainConfig, dataset, teacher, cached: bool, warmup: int, work: Path) -> float:
    """Median images/s of the steps after ``warmup``."""
    student = build_trainee(cfg, dataset)
    head = teacher.head.freeze()
    if cached:
        cache = build_teacher_cache(
            teacher.backbone, dataset, teacher.cfg.mean, teacher.cfg.std, work / "cache", torch.device(cfg.device)
        )
        signal = TeacherSignal(head=head, cache=cache)
    else:
        signal = TeacherSignal(backbone=teacher.backbone, head=head)
    run = Path(tempfile.mkdtemp(dir=work))
    fit(student, cfg, LossWeights(ce=1.0, th_ce=1.0, l2e=1.0), dataset, run, teacher=signal)
    rates = [json.loads(line)["images_per_s"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(rates[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mbf")
    parser.add_argument("--teacher", default="r18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dataset = SyntheticIdentities(
        identities=16, images_per_identity=args.batch_size // 4, image_size=args.image_size, seed=0
    )
    base = TrainConfig(
        model=args.model,
        batch_size=args.batch_size,
        steps=args.steps,
        log_every=1,
        checkpoint_every=10**9,
        device=args.device,
        warmup_steps=0,
        lr=0.01,
    )
    teacher = build_trainee(replace(base, model=args.teacher, seed=1), dataset)
    teacher.backbone.eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for compiled in (False, True):
            for cached in (False, True):
                torch._dynamo.reset()
                started = time.perf_counter()
                rate = measure(replace(base, compile=compiled), dataset, teacher, cached, args.warmup, Path(tmp))
                rows.append(
                    {
                        "compile": compiled,
                        "teacher_cache": cached,
                        "images_per_s": rate,
                        "wall_s": round(time.perf_counter() - started, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n{args.model} student, {args.teacher} teacher, B={args.batch_size}, {args.image_size}x{args.image_size}, "
        f"device={args.device}, threads={torch.get_num_threads()}, torch {torch.__version__}"
    )
    print("| step | teacher | images/s |\n|---|---|---|")
    for row in rows:
        print(
            f"| {'compiled' if row['compile'] else 'eager'} | {'cache' if row['teacher_cache'] else 'live'} | "
            f"{row['images_per_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
