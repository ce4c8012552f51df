"""KD methods (vanilla, kd, l2e, th-kd, sh-kd) as loss-weight presets, and the pipelines that run them.

Called, the package is the Python API's ``distill`` (``from edgekd import distill; distill(data=...)``): the name
``edgekd.distill`` cannot be both this package and a function, so the package answers the call.
"""

import sys

from edgekd import CommandPackage
from edgekd.distill.methods import METHODS as METHODS
from edgekd.distill.methods import method_weights as method_weights

sys.modules[__name__].__class__ = CommandPackage
