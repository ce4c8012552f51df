"""The state of a class-sharded run as torch.distributed.checkpoint (DCP) saves it, and reading it back anywhere.

A multi-rank run checkpoints into the usual ``<run>/checkpoints/step_0000200/`` folder, but with DCP's files
(``.metadata`` and one ``__<rank>_0.distcp`` per rank) and ``state.json`` (step, config, the bundle's metadata, and
an fp16 run's loss scaler, which rank 0 writes and every rank reads back: the ranks' scalers agree, as they skip the
same steps, ``edgekd.train.precision``).
``.metadata`` is DCP's own file, versioned by torch; ``state.json`` carries edgekd's checkpoint format version, which
``edgekd.train.checkpoint.read_state`` checks before any of these files is read. The state is one nested dict, keyed
as a bundle is (``edgekd.bundle``):

- ``model``: ``backbone.*`` (the same on every rank; DCP writes it once) and ``head.weight``/``head.bias``, each rank's
  class shard wrapped as a ``DTensor`` of the full ``(C, D)`` shape (``Shard(0)`` in ``torch.chunk`` sizes, which is
  the split of ``edgekd.distributed.shards``);
- ``optim``: the SGD momentum of each trainable parameter, ``<name>.momentum_buffer``, the head's sharded the same way;
- ``rng``: each rank's torch RNG state, ``rank<r>``.

Because DCP records which global rows each file holds, the same folder loads at another world size (the ranks ask
for their own shards) and into a single process (``load_full``: full tensors, no process group), which is how a
sharded run's checkpoint reaches eval and export.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from edgekd.bundle import Bundle, bundle_modules
from edgekd.errors import CheckpointError

DCP_METADATA = ".metadata"
MOMENTUM = "momentum_buffer"


def is_dcp_checkpoint(path: Path) -> bool:
    """Whether the checkpoint folder ``path`` was written by DCP (a multi-rank run)."""
    return (Path(path) / DCP_METADATA).is_file()


def saved_keys(path: Path) -> set[str]:
    """The flattened keys (``model.head.weight``, ``optim.head.weight.momentum_buffer``, ...) the checkpoint holds."""
    try:
        return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None


def named_trainable(bundle: Bundle) -> list[tuple[str, nn.Parameter]]:
    """The bundle's trainable parameters by bundle key, in the order ``fit`` gives them to the optimizer."""
    return [
        (f"{prefix}.{name}", p)
        for prefix, module in bundle_modules(bundle)
        for name, p in module.named_parameters()
        if p.requires_grad
    ]


def model_state(bundle: Bundle) -> dict[str, torch.Tensor]:
    """The bundle's tensors by bundle key, sharing storage with the modules (DCP loads into them in place)."""
    return {f"{prefix}.{k}": v for prefix, module in bundle_modules(bundle) for k, v in module.state_dict().items()}


def checkpoint_state(
    model: dict[str, torch.Tensor],
    params: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer | None,
    rank: int,
    wrap: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, t: t,
    keys: set[str] | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The DCP state dict over ``model`` and the optimizer's momentum, and the momentum tensors by parameter name.

    Args:
        model: tensors by bundle key (a sharded head's already wrapped as DTensors).
        params: ``(name, parameter)`` of the optimizer's parameters.
        wrap: how a parameter-shaped tensor of ``name`` is stored (a head shard as its DTensor).
        keys: None to save (the optimizer's own buffers); the checkpoint's keys to load (fresh buffers for the
            momentum it holds, to be put into the optimizer with ``set_momentum``).
    """
    momentum = {}
    for name, p in params:
        if keys is None:
            buf = optimizer.state.get(p, {}).get(MOMENTUM) if optimizer is not None else None
        else:
            buf = torch.zeros_like(p.detach()) if f"optim.{name}.{MOMENTUM}" in keys else None
        if buf is not None:
            momentum[name] = buf
    state = {"model": model, "rng": {f"rank{rank}": torch.get_rng_state()}}
    if momentum:
        state["optim"] = {f"{name}.{MOMENTUM}": wrap(name, buf) for name, buf in momentum.items()}
    if keys is not None and f"rng.rank{rank}" not in keys:
        del state["rng"]  # saved at another world size: this rank's generator keeps its state
    return state, momentum


def set_momentum(optimizer: torch.optim.Optimizer, params: list[tuple[str, nn.Parameter]], momentum: dict) -> None:
    """Put loaded momentum buffers into the optimizer's state (SGD keeps nothing else per parameter)."""
    for name, p in params:
        if name in momentum:
            optimizer.state[p][MOMENTUM] = momentum[name]


def check_keys(path: Path, keys: set[str], model: dict) -> None:
    """A one-line CheckpointError when the checkpoint's weights are not this model's (other keys)."""
    saved = {k[len("model.") :] for k in keys if k.startswith("model.")}
    if saved != set(model):
        diff = sorted(saved ^ set(model))
        raise CheckpointError(
            f"checkpoint {path}: its weights do not fit this model ({len(diff)} keys differ, e.g. {diff[0]}); "
            "use the same model settings the checkpoint was trained with"
        )


def load_full(path: Path, bundle: Bundle, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a DCP checkpoint into full, single-process modules (and optimizer), with no process group."""
    path = Path(path)
    keys = saved_keys(path)
    model = model_state(bundle)
    check_keys(path, keys, model)
    params = named_trainable(bundle)
    state, momentum = checkpoint_state(model, params, optimizer, 0, keys=keys)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)  # one process, as meant
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    if optimizer is not None:
        set_momentum(optimizer, params, momentum)
    if "rng" in state:
        torch.set_rng_state(state["rng"]["rank0"])
