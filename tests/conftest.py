"""Shared fixtures: seeded tests, a private edgekd cache folder, tiny synthetic data and models."""

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter (how CI tests them). The variable must be set
# before any @triton.jit function is defined; this root conftest loads before every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_cache(tmp_path_factory, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setenv("EDGEKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "edgekd-cache"))


@pytest.fixture
def run_cli(capsys):
    """Run the real ``edgekd`` entry point in-process; returns (exit code, stdout, stderr)."""
    from edgekd.cli import main

    def run(argv):
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def tiny_faces():
    """8 identities × 8 images at 32×32: enough for a few training steps."""
    from edgekd.data.synthetic import SyntheticIdentities

    return SyntheticIdentities(identities=8, images_per_identity=8, image_size=32, seed=0)
