"""``edgekd study`` end to end on the tiny profile: generated Fashion-MNIST idx files and tiny synthetic faces, one
seed; every cell runs, the report has every row with mean ± std, the plots exist, and a rerun resumes."""

import json
import math
import os
import struct

import numpy as np
import pytest
import torch

from edgekd.study import build_profile
from edgekd.study.report import format_weights, mean_std
from edgekd.study.runner import Cell

TRAIN_IMAGES = 5000 + 96  # the Fashion-MNIST reader carves a 5,000-image val split out of train


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory):
    """Small learnable idx files: each class is a bright band at its own rows, plus noise."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", TRAIN_IMAGES), ("t10k", 64)):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images = rng.integers(0, 80, (n, 28, 28), dtype=np.uint8)
        for k in range(10):
            images[labels == k, 2 * k + 4 : 2 * k + 7, 4:24] = 220
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(images))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))
    return root


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _chosen_cells(profile, out):
    for plan in profile.datasets:
        selection = json.loads((out / plan.name / "selection.json").read_text())
        for row in plan.rows:
            label = selection[row.key]["chosen"]
            yield plan, row, out / Cell(plan, row, next(v for v in row.variants if v.label == label), 0).folder


@pytest.mark.slow
def test_tiny_study_runs_every_cell_reports_and_resumes(tmp_path, fmnist_root, run_cli, one_thread):
    out = tmp_path / "study"
    argv = ["study", "--profile", "tiny", "--out", str(out), "--fmnist-root", str(fmnist_root), "--device", "cpu"]
    code, stdout, stderr = run_cli(argv)
    assert code == 0, stderr
    profile = build_profile("tiny", fmnist_root=str(fmnist_root))
    cells = [Cell(p, r, v, 0) for p in profile.datasets for r in p.rows for v in r.variants]
    assert stdout.count(": training (") == len(cells)
    for cell in cells:  # every variant trained and validated
        result = json.loads((out / cell.folder / "result.json").read_text())
        assert result["row"] == cell.row.key and result["variant"] == cell.variant.label
        assert 0.0 <= result["val"][cell.plan.selection_metric] <= 1.0
        assert not list((out / cell.folder).rglob("checkpoints"))  # pruned once the cell is done
    for plan, _row, folder in _chosen_cells(profile, out):  # one test evaluation per row
        test = json.loads((folder / "test.json").read_text())["test"]
        assert set(test) >= ({"accuracy", "tar@0.001", "tar@0.0001"} if plan.face else {"top1"})
    # SH-KD reuses the vanilla cell as stage I0 and shares I0 + I1 between its variants
    for plan in profile.datasets:
        sh = next(r for r in plan.rows if r.method == "sh-kd")
        first, second = (out / Cell(plan, sh, v, 0).folder / "sh_kd" for v in sh.variants)
        vanilla = out / plan.name / "seed0" / "vanilla" / "preset" / "student.safetensors"
        assert os.path.samefile(first / "i0" / "student.safetensors", vanilla)
        assert os.path.samefile(second / "i1" / "teacher.safetensors", first / "i1" / "teacher.safetensors")

    report = (out / "REPRODUCTION.md").read_text()
    assert "edgekd study --profile tiny" in report and "Total wall time" in report and "torch" in report
    for plan in profile.datasets:
        for row in plan.rows:
            line = next(li for li in report.splitlines() if li.startswith(f"| {row.key} |"))
            assert "±" in line, line
        for kind in ("test", "curves"):
            png = out / "plots" / f"{plan.name}_{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| kd | val top-1" not in report and "T=2" in report  # the selection table lists kd's variants

    assert not (out / "cache").exists()  # teacher-embedding caches go once every cell is done
    (out / "REPRODUCTION.md").unlink()
    assert run_cli(["study", "--report-only", "--out", str(out)])[0] == 0
    assert (out / "REPRODUCTION.md").read_text() == report

    stamp = (out / cells[0].folder / "result.json").stat().st_mtime_ns
    code, stdout, stderr = run_cli(argv)
    assert code == 0, stderr
    assert ": training (" not in stdout and stdout.count("done earlier, skipped") == len(cells)
    assert f"0 of {len(cells)} cells trained" in stdout
    assert (out / cells[0].folder / "result.json").stat().st_mtime_ns == stamp

    # a cell whose result is lost is redone alone (its trained file is kept, so only evaluation reruns)
    lost = out / cells[3].folder
    (lost / "result.json").unlink()
    code, stdout, stderr = run_cli([*argv, "--datasets", cells[3].plan.name])
    assert code == 0, stderr
    assert stdout.count(": training (") == 1
    assert len(json.loads((out / "study.json").read_text())["invocations"]) == 3


def test_missing_fashion_mnist_is_one_line_with_the_fix(tmp_path, run_cli):
    code, stdout, stderr = run_cli(
        ["study", "--profile", "tiny", "--out", str(tmp_path / "s"), "--fmnist-root", str(tmp_path / "nowhere")]
    )
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "apt-get install dataset-fashion-mnist" in stderr and "--datasets synthetic" in stderr
    assert not (tmp_path / "s").exists()


def test_profiles_and_helpers():
    full, quick = build_profile("full"), build_profile("quick")
    assert full.seeds >= 3 and quick.seeds == 1
    for plan in full.datasets:
        keys = [r.key for r in plan.rows]
        assert {"teacher", "vanilla", "kd", "l2e", "th-kd/code", "th-kd/paper"} <= set(keys)
        assert any(k.startswith("sh-kd/") for k in keys)
        assert all(len(r.variants) == 3 for r in plan.rows if r.method not in ("teacher", "vanilla"))
    assert all(len(r.variants) == 1 for p in quick.datasets for r in p.rows)
    assert [p.name for p in build_profile("full", seeds=5, datasets=["synthetic"]).datasets] == ["synthetic"]
    with pytest.raises(ValueError, match="unknown dataset"):
        build_profile("full", datasets=["cifar"])
    mean, std = mean_std([0.5, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(math.sqrt(0.02))
    assert math.isnan(mean_std([0.5])[1])
    assert format_weights({"ce": 1.0, "kd": 1.5, "th_ce": 0.0, "th_kd": 0.02, "l2e": 0.0, "T": 4.0}) == (
        "ce 1, kd 1.5, th_kd 0.02, T 4"
    )


def test_verify_identities_on_separable_embeddings():
    """Embeddings that put each identity at its own angle: every genuine pair scores 1, every impostor less."""
    from types import SimpleNamespace

    from edgekd.bundle import Bundle
    from edgekd.study.evaluate import verify_identities

    class Angle(torch.nn.Module):
        cfg = SimpleNamespace(mean=(0.0,), std=(1.0,))

        def forward(self, x):
            theta = x.mean(dim=(1, 2, 3)) * 255 / 10 * 0.3  # 0.3 rad per identity; flips change nothing
            return torch.stack([theta.cos(), theta.sin()], dim=1)

    labels = np.repeat(np.arange(10), 4)
    images = torch.from_numpy(labels * 10).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    out = verify_identities(Bundle(backbone=Angle()), images, labels, device="cpu")
    assert out["genuine"] == 10 * 6 and out["impostor"] == 40 * 39 // 2 - 60
    assert out["accuracy"] == 1.0 and out["tar@0.001"] == 1.0 and out["tar@0.0001"] == 1.0
    shuffled = verify_identities(Bundle(backbone=Angle()), images, np.roll(labels, 1), device="cpu")
    assert shuffled["accuracy"] < 1.0 and shuffled["tar@0.001"] < 1.0
