"""``edgekd::shared_head_triton``: the fused Triton shared-head loss as a ``torch.library`` custom op.

Signatures (see ``shared_head_autograd``)::

    edgekd::shared_head_triton(Tensor z_s, Tensor labels, Tensor? W_s, Tensor? b_s, Tensor z_st, Tensor? W_t,
                               Tensor? b_t, Tensor? z_t, int kind, float s, float m, float T, int terms,
                               int block_c) -> (Tensor losses, Tensor stats)
    edgekd::shared_head_triton_bwd(Tensor grad, Tensor stats, ..., int need) -> (dz_s, dz_st, dW_s, db_s)

Importing this module registers the op (Triton itself is imported on the first call) and defines
``shared_head_loss_triton``, which ``edgekd.losses`` loads as the ``triton`` backend on first use; it raises
ImportError when Triton is not installed.
"""

from __future__ import annotations

import importlib.util

from edgekd.kernels.shared_head_autograd import define_shared_head_op, make_loss_backend

if importlib.util.find_spec("triton") is None:
    raise ImportError("triton is not installed; the triton loss backend is unavailable")


def _forward(*args):
    from edgekd.kernels.shared_head import shared_head_fwd  # late: it imports Triton, needed only at the first call

    return shared_head_fwd(*args)


def _backward(*args):
    from edgekd.kernels.shared_head import sweep_backward  # late: it imports Triton, needed only at the first call

    return sweep_backward(*args)


shared_head_triton = define_shared_head_op("shared_head_triton", _forward, _backward)
shared_head_loss_triton = make_loss_backend(shared_head_triton)
