"""The precision a run trains in (``--amp``; ``--bf16``, ``--fp16``, ``--fp32``; arcface_torch's ``fp16``).

``amp`` picks the dtype autocast runs the trained backbone's forward in: ``auto`` is bf16 on CUDA and float32
elsewhere (what edgekd always did), ``bf16`` and ``fp16`` autocast on whatever device the run uses, the CPU included
(torch autocasts both there; how fast depends on the CPU's bf16 and fp16 arithmetic), and ``fp32`` does not autocast.
The weights, their gradients and the optimizer stay float32 in every mode, and the loss stops autocast and keeps its
statistics in float32 (``edgekd.losses.shared_head``, "Precision").

float16 has five exponent bits: gradients small enough to underflow it vanish. ``fp16`` therefore scales the loss
(``torch.amp.GradScaler``, arcface_torch's choice): the backward runs on the loss times a scale (2¹⁶ to start), the
gradients are unscaled before the clip, and a step with a gradient that is not finite is skipped (weights and
momentum unchanged) and the scale halved; after 2000 steps without one it doubles. Across ranks the scaler is
``ShardedGradScaler``, which sums the "not finite" flags over the ranks, so every rank skips the same steps though each
holds another shard of the head's gradients. The scaler's state goes into every checkpoint's ``state.json``
(``scaler_state``), so a resumed fp16 run continues with the scale it stopped with.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from edgekd.errors import CheckpointError, EdgekdError

AMP_MODES = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
SCALER_STATE = "loss_scaler"  # the key of the fp16 loss scaler's state in a checkpoint's state.json


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The dtype the backbone's forward autocasts to on ``device`` for ``amp`` (one of ``AMP_MODES``, as
    ``TrainConfig`` checks); None: float32, no autocast."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "fp32"
    dtype = _DTYPES[amp]
    if dtype is not None and not torch.amp.is_autocast_available(device.type):
        raise EdgekdError(f"--{amp}: torch has no autocast on {device.type}; use --fp32")
    return dtype


def loss_scaler(amp: str, device: torch.device, group: dist.ProcessGroup | None = None) -> torch.amp.GradScaler:
    """fp16's loss scaler on ``device`` (over the ranks of ``group`` when given); for every other mode a disabled one,
    whose ``scale``, ``unscale_``, ``step`` and ``update`` are the plain backward and ``optimizer.step()``."""
    if amp != "fp16":
        return torch.amp.GradScaler(device.type, enabled=False)
    if group is not None:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler  # also made for DDP's replicas

        return ShardedGradScaler(device.type, process_group=group)
    return torch.amp.GradScaler(device.type)


def scaler_state(scaler: torch.amp.GradScaler) -> dict:
    """What a checkpoint's ``state.json`` keeps of ``scaler``: its state (scale, growth tracker) under fp16, else
    nothing. Python floats and ints, which JSON writes and reads back exactly."""
    return {SCALER_STATE: scaler.state_dict()} if scaler.is_enabled() else {}


def restore_scaler(scaler: torch.amp.GradScaler, state: dict, path) -> None:
    """Give ``scaler`` the state a checkpoint's ``state`` holds (nothing where the scaler is disabled or the
    checkpoint holds none: a run that did not train in fp16 until then starts with the initial scale)."""
    saved = state.get(SCALER_STATE)
    if not scaler.is_enabled() or saved is None:
        return
    try:
        scaler.load_state_dict(saved)
    except (AttributeError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path}: its {SCALER_STATE} state is damaged ({exc})") from None
