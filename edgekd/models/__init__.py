"""Model registry: face students and teachers, small CNNs, and any timm architecture as an embedding backbone.

Every model maps normalized images ``(B, C, H, W)`` to an embedding ``(B, embed_dim)`` (no classifier inside) and
carries ``model.embed_dim`` and ``model.cfg`` (a ``ModelCfg``). Build one with ``create_model(name, **kwargs)``.
"""

from edgekd.models import iresnet as iresnet  # noqa: F401  (registers r18 ... r100, r_tiny)
from edgekd.models import mobilefacenet as mobilefacenet  # noqa: F401  (registers mbf, mbf_large, ...)
from edgekd.models import small_cnn as small_cnn  # noqa: F401  (registers cnn_small, cnn_tiny)
from edgekd.models import timm_backbone as timm_backbone  # noqa: F401  (registers the timm/<arch> family)
from edgekd.models._cfg import ModelCfg as ModelCfg
from edgekd.models._factory import check_model_kwargs as check_model_kwargs
from edgekd.models._factory import create_model as create_model
from edgekd.models._factory import require_model as require_model
from edgekd.models._registry import is_model as is_model
from edgekd.models._registry import list_models as list_models
from edgekd.models._registry import model_entrypoint as model_entrypoint
from edgekd.models._registry import register_model as register_model
from edgekd.models._registry import register_model_family as register_model_family
from edgekd.models.convert import load_arcface_torch_state_dict as load_arcface_torch_state_dict
