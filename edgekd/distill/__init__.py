"""KD methods (vanilla, kd, l2e, th-kd, sh-kd) as loss-weight presets, and the pipelines that run them."""

from edgekd.distill.methods import METHODS as METHODS
from edgekd.distill.methods import method_weights as method_weights
