"""Training-step throughput of one process against W gloo ranks on the CPU, at the same global batch (issue 15).

Runs the real training loop (``edgekd.train.loop.fit``) on built-in synthetic identities: one process as ``edgekd
distill`` runs without torchrun, then W spawned gloo ranks as ``edgekd distill --nproc W`` runs (DDP backbone with
synchronized BatchNorm, class-sharded heads, each rank reading its ``N / W`` rows), with the CPU's threads split
between the ranks. TH-KD through the frozen teacher head plus l2e, the teacher embeddings from the cache (its forward
pass costs nothing here), eager (compiling would time Inductor, twice). Reports the median global images/s of the
steps after warm-up; ``--classes`` adds rows with the labels spread over C classes, where the head's sweep is most of
the step and sharding it halves each rank's part.

    python -m bench.distributed_step                          # mbf at 112 px, global batch 32, C = 16 and 100,000
    python -m bench.distributed_step --model mbf_tiny --image-size 32 --steps 4 --warmup 1 --classes   # toy check

Caveats: on one machine the ranks share its cores, memory bandwidth and caches, so W ranks cannot beat one process
using all the threads by more than the part of the step that threads do not already parallelize; gloo collectives
(an all_gather per BatchNorm layer, the head's gathers, DDP's all-reduce) go through the loopback TCP stack. This
measures the overhead of the multi-rank step, not the scaling of a GPU cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from edgekd.data.synthetic import SyntheticIdentities
from edgekd.distill.pipeline import build_trainee
from edgekd.distributed.launch import current_world
from edgekd.heads import create_head
from edgekd.losses import LossWeights
from edgekd.train.config import TrainConfig
from edgekd.train.loop import fit
from edgekd.train.teacher import Teacher
from edgekd.utils.threads import usable_cpus

DISTILL = LossWeights(ce=1.0, th_ce=1.0, l2e=1.0)


class ManyClasses(Dataset):
    """The identities' labels spread over ``num_classes`` (label l -> l * floor(C / n)): a C-wide head to sweep."""

    def __init__(self, dataset, num_classes: int) -> None:
        self.dataset, self.num_classes = dataset, max(num_classes, dataset.num_classes)
        self.stride = self.num_classes // dataset.num_classes
        self.image_size, self.channels = dataset.image_size, dataset.channels
        self.fingerprint = f"{dataset.fingerprint}-C{self.num_classes}"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, int(label) * self.stride


def _run(args, classes: int, work: Path) -> None:
    """One training run in this process (alone, or as one rank); rank 0's metrics.jsonl holds global images/s."""
    torch.set_num_threads(max(1, args.threads // args.world))
    base = SyntheticIdentities(
        identities=args.identities, images_per_identity=max(2, args.batch_size // 4), image_size=args.image_size
    )
    base.tensor()  # every image rendered now, not during a timed step
    data = ManyClasses(base, classes)
    cfg = TrainConfig(model=args.model, batch_size=args.batch_size, steps=args.steps, lr=0.01, warmup_steps=0,
                      compile=False, log_every=1, checkpoint_every=10**9, device="cpu", teacher_cache=True)  # fmt: skip
    teacher = build_trainee(replace(cfg, model=args.teacher, seed=1), data)
    head = create_head(cfg.head, teacher.backbone.embed_dim, data.num_classes, s=cfg.scale).freeze()
    frozen = Teacher(teacher.backbone.eval(), head).with_cache(data, work / "cache", torch.device("cpu"))
    student = build_trainee(cfg, data, embed_dim=teacher.backbone.embed_dim)
    fit(student, cfg, DISTILL, data, work / f"run_{args.world}_{classes}", teacher=frozen, world=current_world())


def _rank(rank: int, args, classes: int, work: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.world), LOCAL_RANK=str(rank))
    os.environ["LOCAL_WORLD_SIZE"] = str(args.world)
    dist.init_process_group("gloo", init_method=f"file://{work}/init_{classes}", rank=rank, world_size=args.world)
    try:
        _run(args, classes, Path(work))
    finally:
        dist.destroy_process_group()


def measure(args, world: int, classes: int, work: Path) -> dict:
    args = argparse.Namespace(**{**vars(args), "world": world})
    started = time.perf_counter()
    if world == 1:
        _run(args, classes, work)
    else:
        mp.start_processes(_rank, args=(args, classes, str(work)), nprocs=world, start_method="spawn")
    lines = (work / f"run_{world}_{classes}" / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(line)["images_per_s"] for line in lines][args.warmup :]
    ips = statistics.median(rates)
    return {"ranks": world, "threads_per_rank": max(1, args.threads // world), "classes": classes,
            "batch_size": args.batch_size, "images_per_s": round(ips, 1),
            "ms_per_step": round(1e3 * args.batch_size / ips, 1), "steps_timed": len(rates),
            "wall_s": round(time.perf_counter() - started, 1)}  # fmt: skip


def table_lines(rows: list[dict]) -> list[str]:
    lines = [
        "| ranks x threads | classes | global batch | images/s | ms/step | vs 1 process |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    alone = {r["classes"]: r["images_per_s"] for r in rows if r["ranks"] == 1}
    for r in rows:
        ratio = r["images_per_s"] / alone[r["classes"]] if r["classes"] in alone else float("nan")
        lines.append(
            f"| {r['ranks']} x {r['threads_per_rank']} | {r['classes']:,} | {r['batch_size']} "
            f"| {r['images_per_s']:.1f} | {r['ms_per_step']:.1f} | {ratio:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mbf")
    parser.add_argument("--teacher", default="r_tiny", help="only its cached embeddings are read while timing")
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--identities", type=int, default=16)
    parser.add_argument("--classes", type=int, nargs="*", default=[100_000], help="many-class rows")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=usable_cpus(), help="CPU threads in all, split between ranks")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for classes in [args.identities, *args.classes]:
            for world in args.ranks:
                work = Path(tmp) / f"w{world}_c{classes}"
                work.mkdir()
                rows.append(measure(args, world, classes, work))
                print(json.dumps(rows[-1]), flush=True)
    print("\n".join(table_lines(rows)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
