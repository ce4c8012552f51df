"""edgekd: classifier-sharing knowledge distillation of compact face and image models, fused loss kernels, export."""

from edgekd.version import __version__ as __version__
