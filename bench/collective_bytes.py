"""Bytes each rank sends per training step, by collective, counted from the collectives a real step issues.

Spawns W gloo ranks on the CPU and runs one ``ShardedTrainee`` step (the step ``edgekd distill --nproc W`` trains):
the student's forward through DDP with synchronized BatchNorm, the class-sharded shared-head loss, backward (DDP's
gradient all-reduce), the gradient clip over all shards, the logged loss and the stop flag. Every collective is
counted on its way to gloo: the ``torch.distributed`` functions edgekd calls are wrapped (``count_collectives``) and
DDP's gradient buckets go through a counting communication hook, so what is counted is what ran.

Bytes sent per rank follow the ring algorithms NCCL and gloo use for large messages: an all_gather of ``s`` bytes per
rank sends ``(W−1)·s``, an all_reduce of ``s`` bytes ``2(W−1)/W·s``, a reduce_scatter of ``s`` bytes in all
``(W−1)/W·s``, a broadcast ``s``. The head's size C enters no collective (each rank sweeps its own shard): the
script checks that by counting the same step at two values of C.

    python -m bench.collective_bytes --world 2 4 8 --markdown        # mbf (D = 512), B = 128 per rank
    python -m bench.collective_bytes --world 2 --batch 8 --model mbf_tiny --image-size 32   # toy check

W = 64 cannot be spawned on this machine; its row is computed from the W = 8 counts with each collective's size law
(per-rank gathers and the all-reduces of parameters and BatchNorm statistics keep their size, the loss's row
reductions and reduce-scatter grow with N = W·B), which the W = 2, 4, 8 counts confirm.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import traceback
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import edgekd.distributed.sharded_loss as sharded_loss
import edgekd.distributed.sync_bn as sync_bn
from edgekd.bundle import Bundle
from edgekd.distributed.launch import current_world
from edgekd.heads import create_head
from edgekd.losses import LossWeights
from edgekd.models import create_model
from edgekd.train.sharded import ShardedTrainee
from edgekd.train.teacher import Teacher

# TH-KD with every head term the method can use, plus l2e: the most traffic one step can cause.
WEIGHTS = {"vanilla": LossWeights(ce=1.0), "th-kd": LossWeights(ce=1.0, kd=1.0, th_ce=1.0, th_kd=1.0, l2e=1.0)}
# Which part of edgekd issued a collective, by the file that called it.
COMPONENTS = {
    "sharded_loss.py": "loss",
    "sync_bn.py": "SyncBatchNorm",
    "head_shard.py": "clip",
    "sharded.py": "loss log + stop flag",
}
_ALL_REDUCE = dist.all_reduce  # DDP's hook calls it unwrapped: the hook counts its buckets itself


def ring_bytes(op: str, nbytes: int, world: int) -> float:
    """Bytes one rank sends for a collective whose tensor argument has ``nbytes`` (module doc)."""
    if op == "all_gather":
        return (world - 1) * nbytes
    if op == "all_reduce":
        return 2 * (world - 1) / world * nbytes
    if op == "reduce_scatter":
        return (world - 1) / world * nbytes
    return nbytes


@contextlib.contextmanager
def count_collectives(record: list):
    """Wrap the collectives edgekd calls; each call appends ``(component, op, bytes of its tensor argument)``."""

    def wrap(op: str, fn, arg: int):
        def counted(*args, **kwargs):
            tensor = args[arg]
            caller = Path(traceback.extract_stack(limit=2)[0].filename).name
            record.append((COMPONENTS.get(caller, caller), op, tensor.numel() * tensor.element_size()))
            return fn(*args, **kwargs)

        return counted

    # (module, attribute, op, index of the argument whose size counts: the input, or the output of a reduce_scatter)
    targets = [
        (dist, "all_reduce", "all_reduce", 0),
        (dist, "broadcast", "broadcast", 0),
        (sharded_loss, "_all_gather", "all_gather", 1),
        (sharded_loss, "_reduce_scatter", "reduce_scatter", 1),
        (sync_bn, "_all_gather", "all_gather", 1),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _, _ in targets]
    try:
        for module, name, op, arg in targets:
            setattr(module, name, wrap(op, getattr(module, name), arg))
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def _ddp_counting_hook(record: list):
    def hook(state, bucket):
        buffer = bucket.buffer()
        record.append(("DDP gradients", "all_reduce", buffer.numel() * buffer.element_size()))
        work = _ALL_REDUCE(buffer, group=state, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0] / dist.get_world_size(state))

    return hook


def one_step(args, classes: int, weights: LossWeights) -> list:
    """The collectives of one ``ShardedTrainee`` step on this rank: ``[(component, op, bytes)]``."""
    world = current_world()
    torch.manual_seed(0)
    backbone = create_model(args.model, input_size=args.image_size, embed_dim=args.dim)
    student = Bundle(backbone, create_head("arcface", args.dim, classes, device="meta"))
    teacher = Teacher(torch.nn.Identity(), create_head("arcface", args.dim, classes).freeze())
    record: list = []
    trainer = ShardedTrainee(student, teacher, world, torch.device("cpu"))
    trainer.backbone.register_comm_hook(world.group, _ddp_counting_hook(record))
    g = torch.Generator().manual_seed(world.rank)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    z_t = torch.randn(args.batch, args.dim, generator=g)
    labels = torch.randint(0, classes, (args.batch,), generator=g)
    with count_collectives(record):
        step = trainer.step_fn(weights, "chunked")
        total, terms = step(x, labels, z_t, 0)
        trainer.reduce(terms, total, weights)
        total.backward()
        trainer.clip(5.0)
        trainer.agree(False)
    trainer.close()
    return record


def _worker(rank: int, world: int, args, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{out}/init", rank=rank, world_size=world)
    try:
        results = {}
        for method, weights in WEIGHTS.items():
            counts = [one_step(args, classes, weights) for classes in (world * 64, world * 64 + 37)]
            assert counts[0] == counts[1], "the head's size entered a collective"
            results[method] = counts[0]
        if rank == 0:
            Path(out, "counts.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def count(args, world: int) -> dict:
    """``{method: [(component, op, bytes)]}`` of one step on rank 0 of ``world`` spawned gloo ranks."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, args, out), nprocs=world, start_method="spawn")
        return json.loads(Path(out, "counts.json").read_text())


def per_component(record: list, world: int) -> dict[str, float]:
    """Bytes sent per rank, summed by component."""
    sent: dict[str, float] = defaultdict(float)
    for component, op, nbytes in record:
        sent[component] += ring_bytes(op, nbytes, world)
    return dict(sent)


def scaled(record: list, counted_world: int, world: int) -> list:
    """``record`` as it would be at ``world`` ranks: the loss's row reductions and its reduce-scatter carry N = W·B
    rows (their sizes scale with W); every other collective's argument keeps its size."""
    out = []
    for component, op, nbytes in record:
        grows = component == "loss" and op in ("all_reduce", "reduce_scatter")
        out.append([component, op, nbytes * world // counted_world if grows else nbytes])
    return out


def partial_fc(args, world: int, params: int) -> dict[str, float]:
    """Partial FC v2 (insightface arcface_torch, plain CE) per rank, from its code (shared/reference/distributed.md):
    all_gather of the float32 embeddings and int64 labels, 3 all_reduces of N floats (row max, sum of exp, target
    probability), a reduce per rank of the N×D embedding gradient (a reduce-scatter), DDP's all-reduce with its
    fp16 compression hook (2 bytes a parameter). No BatchNorm synchronization: each GPU normalizes its own rows."""
    N, B, D = world * args.batch, args.batch, args.dim
    return {
        "loss": ring_bytes("all_gather", B * D * 4 + B * 8, world)
        + 3 * ring_bytes("all_reduce", N * 4, world)
        + ring_bytes("reduce_scatter", N * D * 4, world),
        "DDP gradients": ring_bytes("all_reduce", params * 2, world),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--extrapolate", type=int, nargs="*", default=[64], help="worlds computed from the largest")
    parser.add_argument("--model", default="mbf")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128, help="rows per rank")
    # No collective depends on it (BatchNorm statistics are per channel); 8 ranks of mbf at 64 px were killed for
    # memory beside other jobs on the 24 GB machine.
    parser.add_argument("--image-size", type=int, default=32, help="input size (no collective depends on it)")
    parser.add_argument("--markdown", action="store_true", help="a BENCHMARKS.md table instead of JSON")
    args = parser.parse_args()
    counted = {world: count(args, world) for world in args.world}
    top = max(counted)
    backbone = create_model(args.model, input_size=args.image_size, embed_dim=args.dim)
    n_params = sum(p.numel() for p in backbone.parameters())
    rows = []
    for world in sorted({*counted, *args.extrapolate}):
        for method in WEIGHTS:
            record = counted[world][method] if world in counted else scaled(counted[top][method], top, world)
            source = "counted" if world in counted else f"from W = {top}"
            rows.append({"world": world, "method": method, "source": source,
                         "sent": per_component(record, world), "calls": len(record)})  # fmt: skip
        rows.append({"world": world, "method": "Partial FC (plain CE)", "source": "its code",
                     "sent": partial_fc(args, world, n_params), "calls": None})  # fmt: skip
    if args.markdown:
        print("\n".join(markdown(rows)))
    else:
        print(json.dumps({"model": args.model, "dim": args.dim, "batch_per_rank": args.batch, "params": n_params,
                          "rows": rows}, indent=1))  # fmt: skip


def markdown(rows: list[dict]) -> list[str]:
    """The table of BENCHMARKS.md: MiB sent per rank per step, by component."""
    parts = ("loss", "SyncBatchNorm", "DDP gradients")
    lines = ["| W | step | bytes from | " + " | ".join(parts) + " | other | total |", "|---:|---|---|" + "---:|" * 5]
    for row in rows:
        sent = row["sent"]
        other = sum(v for k, v in sent.items() if k not in parts)
        cells = [f"{sent.get(part, 0) / 2**20:.2f}" for part in parts]
        lines.append(f"| {row['world']} | {row['method']} | {row['source']} | " + " | ".join(cells)
                     + f" | {other / 2**10:.2f} KiB | {sum(sent.values()) / 2**20:.2f} |")  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
