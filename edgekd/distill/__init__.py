"""KD methods (vanilla, kd, l2e, th-kd, sh-kd) as loss-weight presets, and the pipelines that run them.

Called, the package is the Python API's ``distill`` (``from edgekd import distill; distill(data=...)``): the name
``edgekd.distill`` cannot be both this package and a function, so the package answers the call.
"""

import sys
import types

from edgekd.distill.methods import METHODS as METHODS
from edgekd.distill.methods import method_weights as method_weights


class _CallablePackage(types.ModuleType):
    def __call__(self, **settings):
        from edgekd.api import distill  # the API imports the command-line modules, which import this package

        return distill(**settings)


sys.modules[__name__].__class__ = _CallablePackage
