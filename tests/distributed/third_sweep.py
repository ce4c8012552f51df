"""A third blocked backend for the registry tests: the chunked sweep's code at a fixed block of 3 classes, as an op
of its own (``edgekd::shared_head_third``). Registered once in ``edgekd.kernels.sweeps.SWEEPS`` (a test does it with
monkeypatch), it must run as a one-process loss backend and on a rank's class shard without any other edit."""

from __future__ import annotations

from edgekd.kernels import chunked
from edgekd.kernels.shared_head_autograd import define_shared_head_op, make_loss_backend
from edgekd.kernels.shared_head_math import merge_partials
from edgekd.kernels.sweeps import Sweep

BLOCK = 3
SWEEP = Sweep("third", __name__, __name__, "shared_head_loss_third")


def sweep_partials(*args):
    return chunked.sweep_partials(*args[:-1], BLOCK)  # the last argument is block_c


def sweep_backward(*args):
    *head, _, need = args  # block_c, then need
    return chunked.sweep_backward(*head, BLOCK, need)


def _forward(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, T, terms, block_c):
    part = sweep_partials(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, T, terms, block_c)
    return merge_partials(part[None], terms, T)


shared_head_third = define_shared_head_op("shared_head_third", _forward, sweep_backward)
shared_head_loss_third = make_loss_backend(shared_head_third)
