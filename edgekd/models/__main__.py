"""``python -m edgekd.models [PATTERN]``: list registered models with size, input and embedding width.

PATTERN is an fnmatch pattern (``'mbf*'``); ``'timm/<pattern>'`` lists timm architectures instead.
"""

from __future__ import annotations

import sys

import torch

from edgekd.models import create_model, list_models


def main(argv: list[str]) -> int:
    pattern = argv[0] if argv else None
    names = list_models(pattern)
    if pattern is not None and pattern.startswith("timm/"):
        print("\n".join(names))
        return 0
    print(f"{'name':<12} {'params':>10}  {'input (C,H,W)':<15} embed_dim")
    for name in names:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = create_model(name)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:<12} {n:>10,}  {str(model.cfg.input_size):<15} {model.embed_dim}")
    print("any timm architecture: timm/<arch> (python -m edgekd.models 'timm/resnet*')")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
