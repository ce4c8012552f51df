"""Process groups for multi-process training: the world a process runs in, and ``--nproc`` starting one.

``torchrun --nproc-per-node N -m edgekd.cli distill ...`` (or ``edgekd distill --nproc N ...``, which runs that
same launcher with the same arguments) starts N processes with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in their
environment. ``init_world`` joins them into one process group: NCCL when they train on CUDA (each takes the GPU of its
local rank), gloo on the CPU. A process started without those variables is a world of one and trains exactly as
before: nothing here runs then.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from edgekd.distributed.sharded_loss import check_sharded_backend
from edgekd.errors import EdgekdError
from edgekd.utils.device import resolve_device
from edgekd.utils.threads import usable_cpus

# What torchrun sets in every process it starts.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# Long enough for rank 0 alone to evaluate or write a large checkpoint while the others wait at a barrier.
TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    """The processes a run trains on: this one's rank among ``size``, and their process group (None alone)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    group: dist.ProcessGroup | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, writes run-level files and evaluates."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing in a world of one)."""
        if self.group is not None:
            dist.barrier(group=self.group)

    @property
    def head_device(self) -> str | None:
        """Where a fresh class head is built: on the meta device in a world of several ranks (each then computes
        only its class shard's rows, ``HeadShard``), in memory in a world of one."""
        return "meta" if self.distributed else None

    @property
    def reads_shards(self) -> bool:
        """Whether a frozen head is read from its file a class shard at a time (``load_bundle(lazy_head=...)``)."""
        return self.distributed

    def decide(self, question):
        """``question()`` as rank 0 answers it, on every rank (called on rank 0 alone): one view of the file system,
        or of anything ranks may see differently (file times on other nodes), for the whole run."""
        return self.broadcast(question() if self.is_main else None)

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object), on every rank."""
        if self.group is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def check_visible(self, path: Path, advice: str) -> None:
        """Raise the same one-line ``EdgekdError`` on every rank unless every rank sees ``path`` (one rank 0 found or
        wrote): ranks on other nodes need a filesystem they share, and a rank that went on without the file would
        leave the others waiting in a collective. A collective itself: every rank calls it."""
        if self.group is None:
            return
        seen = [None] * self.size
        dist.all_gather_object(seen, Path(path).exists(), group=self.group)
        blind = [str(rank) for rank, ok in enumerate(seen) if not ok]
        if blind:
            ranks = f"rank{'s' if len(blind) > 1 else ''} {', '.join(blind)}"
            raise EdgekdError(f"{ranks} of {self.size} cannot see {path}, which rank 0 sees; {advice}")


# This process alone: what code that is not given a world runs in.
ONE_PROCESS = World()


def check_torchrun_env(environ=os.environ) -> None:
    """Refuse, in one line, torchrun variables that cannot make a world (set by hand, or left over from another job):
    a rank variable without the others, values that are not whole numbers, a rank outside the world, or a world of
    several ranks without MASTER_ADDR / MASTER_PORT to meet at. Any of them would otherwise end in a traceback, or in
    a rank waiting for partners that never come."""
    hint = "start edgekd with torchrun or --nproc, or unset them"
    present = [name for name in TORCHRUN_ENV[:3] if name in environ]
    if not present:
        return
    missing = [name for name in TORCHRUN_ENV[:3] if name not in environ]
    if missing:
        given = ", ".join(f"{name}={environ[name]}" for name in present)
        raise EdgekdError(f"torchrun variables are incomplete: {given} but no {' or '.join(missing)}; {hint}")
    values = {}
    for name in (*TORCHRUN_ENV, "MASTER_PORT"):
        if name in environ:
            try:
                values[name] = int(environ[name])
            except ValueError:
                raise EdgekdError(f"{name}={environ[name]!r} is not a whole number; {hint}") from None
    rank, size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    local_size = values.get("LOCAL_WORLD_SIZE", size)
    if size < 1 or not 0 <= rank < size:
        raise EdgekdError(f"RANK={rank} is not a rank of WORLD_SIZE={size} (ranks 0..{size - 1}); {hint}")
    if local_size < 1 or not 0 <= local_rank < local_size or local_size > size:
        raise EdgekdError(
            f"LOCAL_RANK={local_rank} of LOCAL_WORLD_SIZE={local_size} does not fit a world of {size}; {hint}"
        )
    if size > 1:
        unset = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
        if unset:
            raise EdgekdError(f"WORLD_SIZE={size} but {' and '.join(unset)} not set: the ranks cannot meet; {hint}")


def launched() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process as a rank of a larger world."""
    return all(name in os.environ for name in TORCHRUN_ENV[:3]) and int(os.environ["WORLD_SIZE"]) > 1


def current_world() -> World:
    """The world of the initialized default process group, or a world of one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return World()
    return World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        local_size=int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
        group=dist.group.WORLD,
    )


def check_batch_split(batch_size: int, world_size: int) -> int:
    """Rows per rank of a global ``--batch-size``; a batch that does not split evenly is a one-line error."""
    if batch_size % world_size:
        raise EdgekdError(
            f"--batch-size {batch_size} is the global batch and must split evenly over {world_size} ranks; "
            f"use a multiple of {world_size}"
        )
    return batch_size // world_size


def init_world(device: str) -> World:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on the CPU); a world of one when not launched.

    On CUDA each rank takes the GPU of its local rank (``--device cuda`` or ``auto``; an explicit ``cuda:N`` would
    put every rank on one GPU and is refused).
    """
    if not launched():
        return World()
    if dist.is_initialized():
        return current_world()
    local_rank, local_size = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    target = resolve_device(device)
    device_id = None
    if target.type == "cuda":
        if target.index is not None and local_size > 1:
            raise EdgekdError(
                f"--device {device} would put all {local_size} ranks on one GPU; use --device cuda "
                "(each rank takes the GPU of its local rank)"
            )
        if local_rank >= torch.cuda.device_count():
            raise EdgekdError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} are visible")
        torch.cuda.set_device(local_rank)
        device_id = torch.device("cuda", local_rank)
    backend = "nccl" if device_id is not None else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT, device_id=device_id)
    dist.barrier()  # every rank has read its settings before any of them writes to the run folder
    return current_world()


def threads_per_rank(threads: int | None) -> int | None:
    """``--threads`` as given, or the usable CPUs split between the ranks of this machine (torchrun runs)."""
    if threads or not launched():
        return threads
    return max(1, usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def relaunch(nproc: int, argv: list[str]) -> None:
    """Run ``edgekd <argv>`` as ``nproc`` ranks on this machine under torchrun's launcher (from a process torchrun did
    not start: ``start_world``); returns when all end.

    The same command line as ``torchrun --standalone --nproc-per-node nproc -m edgekd.cli <argv>``. Each rank prints
    its own errors; a rank that fails makes this a one-line error naming it (exit 2), unless every failed rank was
    stopped by SIGINT/SIGTERM after saving a checkpoint (then the exit status is theirs, 130 or 143).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException  # only the launcher needs these
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # Threads: the usable CPUs split between the ranks, unless the user chose (torchrun's own default is 1).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // nproc)))
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "edgekd.cli"])
    # Set after parsing: torchrun's parser would read the command's options (--nproc) as its own.
    args.training_script_args = list(argv)
    try:
        run(args)
    except SignalException as exc:
        # Ctrl-C / SIGTERM reached every rank too (the terminal's process group); torchrun stopped them, and each
        # printed where it saved and how to resume.
        raise SystemExit(128 + int(exc.sigval)) from None
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        if set(codes.values()) <= {130, 143}:
            raise SystemExit(max(codes.values())) from None
        failed = ", ".join(f"rank {rank} (exit {code})" for rank, code in sorted(codes.items()))
        raise EdgekdError(f"{failed} of {nproc} failed; the error of each rank is printed above") from None


def start_world(nproc: int, device: str, batch_size: int, argv: list[str], loss_backend: str = "auto") -> World | None:
    """The world this command trains in; None in a process that ran the command as ``nproc`` ranks (``relaunch``).

    ``--nproc 1`` (the default) under torchrun is the world torchrun made; another ``--nproc`` than torchrun's
    ranks per machine is refused, and so are a global ``batch_size`` that does not split evenly over the ranks and a
    ``loss_backend`` that cannot run on a class shard, before any rank starts.
    """
    check_torchrun_env()
    world_size = int(os.environ["WORLD_SIZE"]) if launched() else nproc
    check_batch_split(batch_size, world_size)
    if world_size > 1:
        check_sharded_backend(loss_backend)
    if nproc > 1 and not launched():
        relaunch(nproc, argv)
        return None
    if nproc > 1 and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) != nproc:
        raise EdgekdError(
            f"--nproc {nproc} inside a torchrun world of {os.environ.get('LOCAL_WORLD_SIZE')} local ranks; "
            "drop --nproc (torchrun's --nproc-per-node decides)"
        )
    return init_world(device)
