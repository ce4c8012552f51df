"""Memory per rank of a class-sharded head at Partial FC scale (C = 2,000,000, D = 512): one rank vs two (gloo, CPU).

Per rank, all fp32:
- the student head shard ``W_s``, its gradient and its SGD momentum, and the frozen teacher head shard ``W_t``:
  bytes of the allocated tensors (each ``ceil(C/W)·D·4`` or less);
- the loss's working memory: the rise of the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)
  during one forward + backward of ``sharded_shared_head_loss`` (ce, kd, th_ce, th_kd; ArcFace; one shared
  embedding, as ``shared_head_loss`` passes it), less the gradient ``dW_s`` that the backward allocates. It holds the
  gathered rows, the per-row statistics and partials, and the live class blocks of the sweep (``block_c`` classes:
  ``(N, block_c)`` logits and ``(block_c, D)`` weight blocks), and no ``(N, C)`` matrix.

Each setting runs in fresh spawned processes (one per rank) with glibc's mmap threshold fixed at 64 KiB
(``MALLOC_MMAP_THRESHOLD_``), so every tensor above it is its own mapping and freeing it returns its pages: the peak
then tracks live tensor bytes. The global batch is the same ``N`` rows in every setting (``N / W`` per rank). A W = 1
setting needs about 3·C·D·4 bytes resident (11.4 GiB at the defaults: W_s, W_t, dW_s; the momentum buffer is
allocated but never touched, so it is counted, not resident), so the script checks ``MemAvailable`` first. Seconds
per step are CPU times on this machine, not a speed benchmark.

    python -m bench.sharded_head_memory                                   # C = 2M, D = 512, N = 64, W = 1 and 2
    python -m bench.sharded_head_memory --classes 20000 --rows 16         # toy check, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from edgekd.distributed import class_shard_of, sharded_shared_head_loss
from edgekd.heads import HeadSpec
from edgekd.kernels.chunked import default_block_c
from edgekd.losses import LossWeights

WEIGHTS = LossWeights(ce=1.0, kd=1.0, th_ce=1.0, th_kd=1.0)
HEAD = HeadSpec("arcface")
MIB = 2**20


def _status(key: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _step(z, labels, W_s, W_t, z_t, group, classes, block_c) -> None:
    terms = sharded_shared_head_loss(z, labels, W_s, None, z, W_t, None, z_t, HEAD, WEIGHTS, group=group,
                                     num_classes=classes, block_c=block_c)  # fmt: skip
    sum(getattr(WEIGHTS, name) * value for name, value in terms.items()).backward()


def _rank(rank: int, world: int, args: argparse.Namespace, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = dist.group.WORLD
    shard = class_shard_of(args.classes, group)
    g = torch.Generator().manual_seed(rank)
    W_s = torch.empty(shard.size, args.dim).normal_(0.0, 0.1, generator=g).requires_grad_()
    momentum = torch.empty_like(W_s)  # SGD's buffer, counted by its bytes; left untouched, so not resident here
    W_t = torch.empty(shard.size, args.dim).normal_(0.0, 0.1, generator=g)
    B = args.rows // world
    z = torch.randn(B, args.dim, generator=g).requires_grad_()
    z_t, labels = torch.randn(B, args.dim, generator=g), torch.randint(0, args.classes, (B,), generator=g)

    # Warm-up on a 2-rank toy head of the same code path: imports, op registration, gloo and allocator pools.
    toy = class_shard_of(2 * world, group)
    toy_W = torch.randn(toy.size, args.dim, generator=g).requires_grad_()
    _step(z, labels % (2 * world), toy_W, toy_W.detach(), z_t, group, 2 * world, args.block_c)
    z.grad = None
    dist.barrier(group)

    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
    base = _status("VmRSS")
    start = time.perf_counter()
    _step(z, labels, W_s, W_t, z_t, group, args.classes, args.block_c)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    record = {
        "rank": rank,
        "classes": shard.size,
        "W_s": W_s.nbytes,
        "grad": W_s.grad.nbytes,
        "momentum": momentum.nbytes,
        "W_t": W_t.nbytes,
        "work": peak - base - W_s.grad.nbytes,
        "seconds": seconds,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> list[dict]:
    """One setting in ``world`` fresh processes; the per-rank records."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(world, args, f"{tmp}/init", tmp), nprocs=world, start_method="spawn")
        return [json.loads(Path(tmp, f"rank{rank}.json").read_text()) for rank in range(world)]


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / MIB:.0f} MiB"


def table(results: dict[int, list[dict]], args: argparse.Namespace) -> list[str]:
    lines = [
        "| ranks W | classes per rank | N rows (per rank) | block_c | W_s | dW_s | momentum | W_t (frozen) "
        "| loss working memory (measured) | total per rank | CPU s/step |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for world, records in results.items():
        r = records[0]  # rank 0 holds the largest shard (torch.chunk sizes)
        block = args.block_c or default_block_c(args.rows, r["classes"])
        total = r["W_s"] + r["grad"] + r["momentum"] + r["W_t"] + r["work"]
        work = " / ".join(_gib(rec["work"]) for rec in records)
        lines.append(
            f"| {world} | {r['classes']:,} | {args.rows} ({args.rows // world}) | {block:,} | {_gib(r['W_s'])} "
            f"| {_gib(r['grad'])} | {_gib(r['momentum'])} | {_gib(r['W_t'])} | {work} | {_gib(total)} "
            f"| {max(rec['seconds'] for rec in records):.0f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rows", type=int, default=64, help="global batch N, split evenly over the ranks")
    parser.add_argument("--block-c", type=int, default=0, help="classes per sweep block (0: the loss's default)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    need = 3 * args.classes * args.dim * 4  # W_s, dW_s and W_t resident at W = 1
    available = int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) * 1024
    if need > 0.9 * available:
        sys.exit(f"a W = 1 setting needs about {_gib(need)} resident; only {_gib(available)} is available")
    # Set before the spawns: glibc reads it at process start (see the module docstring).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.environ["OMP_NUM_THREADS"] = "1"
    results = {world: measure(world, args) for world in args.worlds}
    print(f"C = {args.classes:,}, D = {args.dim}, fp32, torch {torch.__version__}, gloo on the CPU\n")
    print("\n".join(table(results, args)))


if __name__ == "__main__":
    main()
