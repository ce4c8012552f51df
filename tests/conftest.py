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
def network_atol():
    """``network_atol(model, reference)``: the absolute gap allowed between two float32 evaluations of one network
    that differ only in rounding (another batch split, ONNX Runtime against PyTorch, BatchNorm folded or not).

    Each Conv/Linear layer's K-term sums come out about one ulp (u = 2⁻²⁴) of the layer's output scale off the exact
    sums in each evaluation (terms of either sign: the rounding is ≈ √K·u·rms and the sum itself ≈ √K·rms), and the
    BatchNorm and activation after it add about as much; later layers carry it on at a gain of about 1 (BatchNorm keeps
    the scale). So two evaluations of L such layers differ by ≲ 2·4·L·u of the output scale: ``8·L·u·max|reference|``
    (r_tiny, L = 14: 112u, measured ≤ 18u; mbf_tiny, L = 29: 232u, measured ≤ 13u, AMD EPYC). ``model`` is a torch
    module (its Conv and Linear layers are counted) or the count itself.
    """

    def atol(model, reference) -> float:
        layers = (
            model
            if isinstance(model, int)
            else sum(isinstance(m, torch.nn.Conv2d | torch.nn.Linear) for m in model.modules())
        )
        scale = reference.abs().max().item() if isinstance(reference, torch.Tensor) else float(abs(reference).max())
        return 8 * layers * 2.0**-24 * scale

    return atol


@pytest.fixture(scope="session")
def tiny_faces():
    """8 identities × 8 images at 32×32: enough for a few training steps."""
    from edgekd.data.synthetic import SyntheticIdentities

    return SyntheticIdentities(identities=8, images_per_identity=8, image_size=32, seed=0)


@pytest.fixture
def one_line():
    """``one_line(code, err, *fragments)``: a user error as the command line prints it — exit code 2, exactly one
    line on stderr starting ``edgekd: error:``, no traceback, each of ``fragments`` in it; returns the line."""

    def check(code, err: str, *fragments: str) -> str:
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, err
        assert len(lines) == 1 and lines[0].startswith("edgekd: error:"), err
        assert "Traceback" not in err
        for fragment in fragments:
            assert fragment in lines[0], lines[0]
        return lines[0]

    return check
