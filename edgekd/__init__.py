"""edgekd: classifier-sharing knowledge distillation of compact face and image models, fused loss kernels, export."""

import types

from edgekd.version import __version__ as __version__

# The Python API (edgekd/api.py) loads on first use: `import edgekd` and the command line's start stay free of torch.
# `distill` and `export` are packages too (edgekd/distill, export/): called, they run the API's functions.
_API = ("train_teacher", "load_model", "evaluate", "Embedder")


class CommandPackage(types.ModuleType):
    """The class of the subpackages named like an API function (``edgekd.distill``, ``edgekd.export``): the name
    cannot be both a package and a function, so the package, called, runs ``edgekd.api``'s function of its name."""

    def __call__(self, *args, **kwargs):
        from edgekd import api  # on first use only: it imports torch and the training stack

        return getattr(api, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def __getattr__(name: str):
    if name in _API:
        from edgekd import api  # on first use only: it imports torch and the training stack

        return getattr(api, name)
    raise AttributeError(f"module 'edgekd' has no attribute {name!r}")
