"""A step's scalar read on the host without making the device wait: the copy is queued, the read comes a step later.

``float(loss)`` in a training step blocks the host until the device has finished the step, so the next step's work
is queued only after the device ran dry. ``Readback`` queues the copy into pinned host memory behind the step's
work and records an event; ``value()`` waits for that event alone. Read one step later, the device always has the
next step queued: the loop checks step k's loss (divergence) and the ranks' stop flags while step k + 1 runs.
"""

from __future__ import annotations

import torch


class Readback:
    """The value of ``tensor`` (one element) on the host, copied without blocking on CUDA; at once elsewhere."""

    def __init__(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self._event = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor

    def value(self) -> float:
        """The value; waits for the work queued before the copy, not for what was queued since."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.item()
