"""The layers of ``edgekd.export``, read from the source: every import (in-function ones too) runs down to a lower
layer or stays inside its own sub-package. Cycles and late imports across the whole tree are tests/test_imports.py's.

Lowest first: the optional-dependency importers and the ONNX passes; the input contract, the checks and the engine
builders; the runtimes; the options and the gated-write job; the engine routes and the latency engine; the export
pipeline; the package face.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

FOLDER = Path(__file__).resolve().parents[2] / "export"
PACKAGE = "edgekd.export"
LAYERS = {
    "optional_deps": 0,
    "passes": 0,
    "contract": 1,
    "checks": 1,
    "builders": 1,
    "runtimes": 2,
    "options": 3,
    "artifact": 3,
    "engine": 4,
    "latency": 4,
    "pipeline": 5,
    "": 6,
}


def _module(path: Path) -> str:
    parts = [p for p in path.relative_to(FOLDER).with_suffix("").parts if p != "__init__"]
    return ".".join([PACKAGE, *parts])


MODULES = {_module(path): path for path in sorted(FOLDER.rglob("*.py"))}


def _part(module: str) -> str:
    """The sub-package or top-level module of ``edgekd.export`` that ``module`` belongs to ("" for the face)."""
    return module.removeprefix(PACKAGE).lstrip(".").split(".")[0]


def _imported(path: Path) -> set[str]:
    """The ``edgekd.export`` modules ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {name for name in found if name in MODULES}


def test_every_part_has_a_layer():
    assert {_part(m) for m in MODULES} == set(LAYERS)
    assert "edgekd.export.artifact" in _imported(MODULES["edgekd.export.engine"])


@pytest.mark.parametrize("module", MODULES)
def test_imports_run_down_the_layers(module):
    part = _part(module)
    upward = sorted(t for t in _imported(MODULES[module]) if _part(t) != part and LAYERS[_part(t)] >= LAYERS[part])
    assert not upward, f"{module} (layer {LAYERS[part]}) imports {upward}"
