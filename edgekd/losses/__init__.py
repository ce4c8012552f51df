"""The classifier-sharing KD loss: term formulas, backends and the ``shared_head_loss`` entry point."""

from edgekd.losses.shared_head import (
    LOSS_BACKENDS as LOSS_BACKENDS,
)
from edgekd.losses.shared_head import (
    list_loss_backends as list_loss_backends,
)
from edgekd.losses.shared_head import (
    load_backend as load_backend,
)
from edgekd.losses.shared_head import (
    register_loss_backend as register_loss_backend,
)
from edgekd.losses.shared_head import (
    resolve_backend as resolve_backend,
)
from edgekd.losses.shared_head import (
    shared_head_loss as shared_head_loss,
)
from edgekd.losses.terms import TERM_NAMES as TERM_NAMES
from edgekd.losses.terms import LossWeights as LossWeights
