"""Packaging: the side folders install as edgekd.kernels / edgekd.export / edgekd.calib, and every package is listed."""

import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    found = set()
    for name, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found == listed


def test_side_folders_import_as_edgekd_subpackages():
    for name, folder in (("kernels", "kernels"), ("export", "export"), ("calib", "calib")):
        module = importlib.import_module(f"edgekd.{name}")
        assert Path(module.__file__).resolve().parent == ROOT / folder
