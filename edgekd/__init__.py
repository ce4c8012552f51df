"""edgekd: classifier-sharing knowledge distillation of compact face and image models, fused loss kernels, export."""

from edgekd.version import __version__ as __version__

# The Python API (edgekd/api.py) loads on first use: `import edgekd` and the command line's start stay free of torch.
# `distill` and `export` are packages too (edgekd/distill, export/): called, they run the API's functions.
_API = ("train_teacher", "load_model", "evaluate", "Embedder")


def __getattr__(name: str):
    if name in _API:
        from edgekd import api  # on first use only: it imports torch and the training stack

        return getattr(api, name)
    raise AttributeError(f"module 'edgekd' has no attribute {name!r}")
