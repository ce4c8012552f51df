"""``ShardedTrainee``: what ``fit`` trains under torchrun, a data-parallel backbone and a class-sharded head.

Each of the W ranks runs the backbone on its ``N / W`` rows of the global batch (``StepOrder``), wrapped in
``DistributedDataParallel`` with its BatchNorm layers computing the global batch's statistics (``SyncBatchNorm``), so
the model trained does not depend on W. The student head and the frozen teacher head are cut into class shards
(``HeadShard``); the loss is the shared-head loss over them (``edgekd::sharded_shared_head``, the chunked or Triton
sweep on the local shard, per-row statistics merged across ranks), so while training no rank holds a full head, its
gradient, its momentum or any ``N × C`` logits. A fresh student head and a teacher head loaded for torchrun come
on the meta device (``build_trainee``, ``load_bundle(lazy_head=True)``): each rank computes or reads only its rows.
Everything that one process would compute on the whole model is computed here from parts:

- the logged loss: the head terms come back identical on every rank; ``l2e`` (a mean over each rank's rows) is
  averaged over the ranks;
- the gradient clip: the norm of the backbone's gradient (identical after DDP's all-reduce) and the head shards'
  (summed over ranks);
- checkpoints: torch.distributed.checkpoint, one folder per step, written under a temporary name and renamed by
  rank 0 once every rank has written (``edgekd.train.dcp_checkpoint``);
- the final model: ``finish`` gathers the head shards into rank 0's trainee (host memory, a piece at a time), so the
  bundle rank 0 writes is the one a single process would have written, and eval and export do not know it was
  sharded.
"""

from __future__ import annotations

import inspect
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

from edgekd.atomic import discard_tree, make_temp_dir
from edgekd.bundle import Bundle, bundle_meta
from edgekd.distributed import make_sharded_backend
from edgekd.distributed.head_shard import HeadShard, clip_grad_norm_, release
from edgekd.distributed.launch import World
from edgekd.distributed.sharded_loss import check_sharded_backend, global_labels
from edgekd.distributed.sync_bn import convert_sync_batchnorm, restore
from edgekd.errors import CheckpointError
from edgekd.heads.class_sampling import ClassSampler
from edgekd.losses import LossWeights
from edgekd.losses.shared_head import head_loss_fn, resolve_backend
from edgekd.train.checkpoint import checkpoint_folders, checkpoint_path, read_state, write_state
from edgekd.train.dcp_checkpoint import (
    check_keys,
    checkpoint_state,
    is_dcp_checkpoint,
    named_trainable,
    saved_keys,
    set_momentum,
)
from edgekd.train.readback import Readback
from edgekd.train.teacher import Teacher
from edgekd.utils.device import move_module

# Inductor's gradient of a 1x1 convolution can come with other strides than DDP's bucket view along its size-1 dims
# (the same memory order); DDP then warns on every step of a compiled run that it copies them.
warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides", UserWarning)


# DDP's option that stops it broadcasting rank 0's buffers before every forward: ``forward_sync_buffers`` from torch
# 2.13, which deprecates the older ``broadcast_buffers`` (the only one before 2.13, e.g. the GPU image's 2.11).
NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def shard_sweep(backend: str, device: torch.device) -> str:
    """How each rank sweeps its head shard for ``--loss-backend backend``: ``chunked`` or ``triton``.

    ``auto`` means what it means in one process (``resolve_backend``): triton on CUDA where it loads, chunked
    elsewhere. ``reference`` forms ``B × C`` logits of a whole head, which a shard cannot: refused in one line.
    """
    check_sharded_backend(backend)
    return resolve_backend(backend, device)


class ShardedTrainee:
    """``trainee`` (and ``teacher``'s head) laid out over the ranks of ``world``; see the module doc.

    The trainee's modules must be on ``device`` already. Until ``close`` its backbone's BatchNorm layers are
    ``SyncBatchNorm`` ones (same parameters and buffers); ``finish`` also writes the trained head shards back.

    ``compile`` (a torch.compile backend name, or None for eager): DDP's own forward (its hooks) runs eagerly, as
    torch.compile always runs it; the backbone inside it and the sharded loss compile as two graphs, each with no
    graph break (DDPOptimizer may split the backbone's at DDP's bucket boundaries, to overlap the all-reduce).
    """

    def __init__(
        self, trainee: Bundle, teacher: Teacher | None, world: World, device: torch.device, compile: str | None = None
    ) -> None:
        self.trainee, self.world, self.device, self.compile = trainee, world, device, compile
        group = world.group
        self._swapped = convert_sync_batchnorm(trainee.backbone, group)
        inner = torch.compile(trainee.backbone, backend=compile) if compile else trainee.backbone
        self.backbone = DistributedDataParallel(
            inner,
            device_ids=[device.index] if device.type == "cuda" else None,
            process_group=group,
            **NO_FORWARD_BUFFER_SYNC,  # SyncBatchNorm keeps the running statistics equal on every rank
        )
        self.head = HeadShard(trainee.head, group).to(device)
        t_head = teacher.head if teacher is not None else None
        self.t_head = HeadShard(t_head, group).to(device) if t_head is not None else None
        if t_head is not None:  # a whole head given by the caller waits in host memory; the device holds its shard
            move_module(t_head, "cpu")
        self.mesh = DeviceMesh.from_group(group, device.type)
        # The optimizer's parameters by bundle key, in one process's order: backbone, then head (its shard here).
        full_names = named_trainable(trainee)
        shard_of = {id(trainee.head.weight): self.head.weight}
        if trainee.head.bias is not None:
            shard_of[id(trainee.head.bias)] = self.head.bias
        self.params = [(name, shard_of.get(id(p), p)) for name, p in full_names]
        release(trainee.head)  # until finish: no rank holds the student's full head
        self._stop_flags: Readback | None = None  # the last step's, read in the next (agree)

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer steps: the backbone's trainable parameters and this rank's head shard."""
        return [p for _, p in self.params]

    def step_fn(self, weights: LossWeights, backend: str, sampler: ClassSampler | None = None):
        """``step_fn(x, labels, z_t, step) -> (total, terms)`` on this rank's rows: DDP's backbone, then the head
        loss, over the rows of this rank's shard that ``sampler`` draws from the global batch's labels."""
        sweep = shard_sweep(backend, self.device)
        sharded = make_sharded_backend(self.world.group, self.head.num_classes, sweep=sweep)
        head_loss = head_loss_fn(self.head, self.t_head, weights, sharded)
        loss = torch.compile(head_loss, backend=self.compile) if self.compile else head_loss
        if sampler is None:
            return lambda x, labels, z_t, step: loss(self.backbone(x), labels, z_t)
        shard, group = self.head.shard, self.world.group

        def step_fn(x: torch.Tensor, labels: torch.Tensor, z_t: torch.Tensor | None, step: int):
            rows = sampler.compiled_rows(step, global_labels(labels, group), shard.start, shard.size)
            return loss(self.backbone(x), labels, z_t, rows)

        return step_fn

    def reduce(
        self, terms: dict, total: torch.Tensor, weights: LossWeights
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's loss and terms as one process would log them: ``l2e`` averaged over the ranks (on the device)."""
        terms = {name: value.detach() for name, value in terms.items()}
        if "l2e" in terms:
            l2e = terms["l2e"].clone()
            dist.all_reduce(l2e, op=dist.ReduceOp.SUM, group=self.world.group)
            terms["l2e"] = l2e / self.world.size
        total = sum(getattr(weights, name) * value for name, value in terms.items())
        return total, terms

    def agree(self, stop: bool) -> bool:
        """Whether any rank was asked to stop, as of the step before: every rank then leaves the loop after the same
        step. The flags of this step are combined on the device and read while the next step runs (``Readback``),
        so the host never waits for the device here."""
        flag = torch.tensor([float(stop)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.world.group)
        previous, self._stop_flags = self._stop_flags, Readback(flag)
        return previous is not None and previous.value() > 0

    def clip(self, max_norm: float) -> None:
        head = [p for p in self.head.parameters() if p.requires_grad]
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        clip_grad_norm_(backbone, head, max_norm, self.world.group)

    def images_per_step(self, local: int) -> int:
        return local * self.world.size

    # Checkpoints.

    def _wrap(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A head shard's tensor as the DTensor of the full head (``Shard(0)`` in torch.chunk sizes)."""
        if not name.startswith("head."):
            return tensor
        shape = (self.head.num_classes, *tensor.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(tensor, self.mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)

    def _model_state(self) -> dict[str, torch.Tensor]:
        model = {f"backbone.{k}": v for k, v in self.trainee.backbone.state_dict().items()}
        for name, p in self.head.named_parameters():
            model[f"head.{name}"] = self._wrap(f"head.{name}", p.detach())
        return model

    def save(self, run_dir: Path, step: int, optimizer: torch.optim.Optimizer, extra: dict, keep: int) -> Path:
        """Every rank writes its part into a temporary folder; rank 0 renames it into place (see module doc)."""
        final = checkpoint_path(run_dir, step)
        tmp = None
        if self.is_main:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = make_temp_dir(final.parent, prefix=f".{final.name}.")
        tmp = self.world.broadcast(tmp)
        try:
            state, _ = checkpoint_state(self._model_state(), self.params, optimizer, self.world.rank, self._wrap)
            dcp.save(state, checkpoint_id=str(tmp), process_group=self.world.group)
            if self.is_main:  # DCP's rank 0 wrote .metadata after every rank had written its files
                info = {
                    "step": step,
                    "format": "dcp",
                    "world_size": self.world.size,
                    "bundle": bundle_meta(self.trainee),
                    "optimizer": {"param_groups": optimizer.state_dict()["param_groups"]},
                    **extra,
                }
                write_state(tmp, info)
                if final.exists():
                    discard_tree(final)
                os.replace(tmp, final)
                for old in checkpoint_folders(run_dir)[:-keep]:
                    discard_tree(old)
        finally:
            if self.is_main and tmp.exists():
                shutil.rmtree(tmp)
        self.world.barrier()
        return final

    def load(self, path: Path, optimizer: torch.optim.Optimizer) -> dict:
        """Restore from a checkpoint of this run at any world size, or of a one-process run (safetensors)."""
        info = read_state(path)
        if is_dcp_checkpoint(path):
            keys = saved_keys(path)
            model = self._model_state()
            check_keys(path, keys, model)
            state, momentum = checkpoint_state(model, self.params, optimizer, self.world.rank, self._wrap, keys)
            dcp.load(state, checkpoint_id=str(path), process_group=self.world.group)
            if "rng" in state:
                torch.set_rng_state(state["rng"][f"rank{self.world.rank}"])
        else:
            momentum = self._load_single_process(path)
        set_momentum(optimizer, self.params, momentum)
        return info

    def _load_single_process(self, path: Path) -> dict[str, torch.Tensor]:
        """Weights and momentum of a one-process checkpoint, the head's cut to this rank's shard."""
        try:
            weights = load_file(str(path / "bundle.safetensors"))
            tensors = load_file(str(path / "optimizer.safetensors"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
        with torch.no_grad():
            backbone = {k[len("backbone.") :]: v for k, v in weights.items() if k.startswith("backbone.")}
            self.trainee.backbone.load_state_dict(backbone, strict=True)
            for name, p in self.head.named_parameters():
                p.copy_(self.head.shard.take(weights[f"head.{name}"]))
        momentum = {}
        for index, (name, _) in enumerate(named_trainable(self.trainee)):
            buf = tensors.get(f"state.{index}.momentum_buffer")
            if buf is not None:
                momentum[name] = (self.head.shard.take(buf) if name.startswith("head.") else buf).to(self.device)
        torch.set_rng_state(tensors["rng.torch"])
        return momentum

    def finish(self) -> None:
        """Join every rank's trained head rows into the trainee's full head on rank 0 (host memory), which writes
        the final bundle; the other ranks' trainee keeps its placeholder head."""
        self.head.gather_into(self.trainee.head)

    def close(self) -> None:
        """Give the trainee its own BatchNorm layers back (they share the trained values)."""
        restore(self._swapped)
        self._swapped = []
