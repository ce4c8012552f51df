"""Fixtures for the export tests: checkpoints of untrained tiny models and one briefly trained student."""

from __future__ import annotations

import pytest
import torch

# The student's training data and the pairs its gates use share this difficulty (the default, 1.0, is too hard for a
# 400-step model to separate identities well enough that a 0.5-point task gate measures INT8 error, not noise).
DIFFICULTY = 0.5
PAIRS = f"synthetic:difficulty={DIFFICULTY}"
GATE_DATA = f"synthetic:difficulty={DIFFICULTY}"


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so folding them is actually tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.3, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                if m.weight is not None and m.weight.requires_grad:
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.2, generator=gen)
    return model.eval()


@pytest.fixture
def make_checkpoint():
    """``make_checkpoint(path, name, input_size=32)``: an untrained model with random BatchNorm statistics, saved."""
    from edgekd.bundle import Bundle, save_bundle
    from edgekd.models import create_model

    def make(path, name: str, input_size: int = 32, **kw):
        torch.manual_seed(0)
        model = randomize_batchnorm(create_model(name, input_size=input_size, **kw))
        return save_bundle(path, Bundle(backbone=model))

    return make


@pytest.fixture(scope="session")
def student_gate_options():
    """Gate data and pairs matching the trained student's training difficulty."""
    return {"pairs": PAIRS, "gate_data": GATE_DATA}


@pytest.fixture(scope="session")
def trained_student(tmp_path_factory):
    """mbf_tiny at 32x32 trained by ``edgekd teacher`` for 400 steps (ArcFace head, CE) on the built-in identities."""
    from edgekd.cli import main

    out = tmp_path_factory.mktemp("student")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is faster than two contended ones on small CPU machines (~20 s)
    try:
        main([
            "teacher", "--model", "mbf_tiny", "--head", "arcface", "--scale", "16", "--margin", "0.2",
            "--data", f"synthetic:identities=200,images_per_identity=8,image_size=32,difficulty={DIFFICULTY}",
            "--image-size", "32", "--batch-size", "64", "--steps", "400", "--lr", "0.2", "--no-compile",
            "--workers", "0", "--device", "cpu", "--seed", "0", "--out", str(out),
        ])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return out / "teacher.safetensors"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run torch single-threaded in these tests: on small shared CPU machines two contended threads are slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
