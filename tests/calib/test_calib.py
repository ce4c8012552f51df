"""Calibration: sets from every source kind, range estimators on known data, and the cache (reuse, invalidation)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgekd.calib import build_calibration_set, calibrate
from edgekd.calib.dataset import CalibrationSet
from edgekd.models import create_model


@pytest.fixture(scope="module")
def tiny_onnx():
    """An untrained mbf_tiny at 32x32 exported to ONNX, and its config."""
    from edgekd.export.passes.onnx import export_onnx

    torch.manual_seed(0)
    model = create_model("mbf_tiny", input_size=32).eval()
    return export_onnx(model, model.cfg), model.cfg


def _identity_conv_model(channels: int = 2, side: int = 40) -> onnx.ModelProto:
    """input (N, C, S, S) -> 1x1 Conv with identity weights -> output: calibration sees exactly the data."""
    w = np.eye(channels, dtype=np.float32).reshape(channels, channels, 1, 1)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["embedding"], name="conv")],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, side, side])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", channels, side, side])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def _set(images: np.ndarray) -> CalibrationSet:
    return CalibrationSet(images=images.astype(np.float32), source="test", fingerprint=str(hash(images.tobytes())))


def _range(result, tensor="input"):
    data = json.loads(result.path.read_text())["data"][tensor]
    lo, hi = (
        np.asarray(data[k]["data"] if isinstance(data[k], dict) else data[k]).item() for k in ("lowest", "highest")
    )
    return lo, hi


def test_observers_on_known_distributions(tmp_path):
    model = _identity_conv_model()
    rng = np.random.default_rng(0)
    images = rng.uniform(-2.0, 2.0, size=(64, 2, 40, 40))  # 204,800 values
    images[0, 0, 0, 0] = 6.0  # one outlier: 0.0005 % of the values
    calib_set = _set(images)
    ranges = {
        m: _range(calibrate(model, calib_set, m, cache_dir=tmp_path)) for m in ("minmax", "percentile", "entropy")
    }
    lo, hi = ranges["minmax"]
    # symmetric: the extreme value on both sides (6.0 passes the identity conv exactly; approx for the JSON's digits)
    assert lo == pytest.approx(-6.0) and hi == pytest.approx(6.0)
    p_amax = max(abs(v) for v in ranges["percentile"])
    assert 1.9 < p_amax < 2.1  # the 99.999th percentile of |x| ignores the outlier
    e_amax = max(abs(v) for v in ranges["entropy"])
    assert 0.5 < e_amax < 6.0  # the KL-optimal clip is below the outlier


def test_calibration_set_sources(tmp_path, tiny_onnx):
    from PIL import Image

    _, cfg = tiny_onnx
    builtin = build_calibration_set("builtin", cfg, num_images=16)
    assert builtin.images.shape == (16, 3, 32, 32) and builtin.images.dtype == np.float32
    assert -1.0 <= builtin.images.min() and builtin.images.max() <= 1.0  # (x/255 - 0.5) / 0.5
    again = build_calibration_set("builtin", cfg, num_images=16)
    assert again.fingerprint == builtin.fingerprint
    assert build_calibration_set("builtin", cfg, num_images=12).fingerprint != builtin.fingerprint

    spec = build_calibration_set("synthetic:identities=10,images_per_identity=2", cfg, num_images=8)
    assert spec.images.shape == (8, 3, 32, 32)

    rng = np.random.default_rng(0)
    flat, classes = tmp_path / "flat", tmp_path / "classes"
    flat.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(flat / f"{i}.png")
        (classes / f"id{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(classes / f"id{i % 2}" / f"{i}.png")
    assert build_calibration_set(str(flat), cfg, num_images=100).images.shape == (5, 3, 32, 32)  # resized
    assert build_calibration_set(str(classes), cfg, num_images=3).images.shape == (3, 3, 32, 32)


def test_cache_is_reused_and_invalidated(tmp_path, tiny_onnx):
    from edgekd.export.passes.int8 import quantize_qdq

    model, cfg = tiny_onnx
    data = build_calibration_set("builtin", cfg, num_images=16)
    cache = tmp_path / "cache"
    first = calibrate(model, data, "minmax", cache_dir=cache)
    assert not first.hit and first.path.is_file() and (cache / f"{first.key}.meta.json").is_file()

    second = calibrate(model, data, "minmax", cache_dir=cache)
    assert second.hit and second.key == first.key and second.path == first.path
    assert quantize_qdq(model, first).SerializeToString() == quantize_qdq(model, second).SerializeToString()

    fewer = build_calibration_set("builtin", cfg, num_images=8)
    other_model = onnx.ModelProto()
    other_model.CopyFrom(model)
    w = other_model.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, w.name))
    misses = [
        calibrate(model, data, "percentile", cache_dir=cache),  # method
        calibrate(model, data, "minmax", settings={"moving_average": True}, cache_dir=cache),  # settings
        calibrate(model, fewer, "minmax", cache_dir=cache),  # data
        calibrate(other_model, data, "minmax", cache_dir=cache),  # model
    ]
    assert all(not m.hit for m in misses)
    assert len({first.key, *(m.key for m in misses)}) == 5

    first.path.write_text("{ not json")  # a corrupt entry is recomputed, not trusted
    redo = calibrate(model, data, "minmax", cache_dir=cache)
    assert not redo.hit and json.loads(redo.path.read_text())
    assert calibrate(model, data, "minmax", cache_dir=cache).hit


def _ranges(result) -> dict:
    data = json.loads(result.path.read_text())["data"]
    return {name: _range(result, name) for name in data}


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
@pytest.mark.parametrize("count", [30, 130])
def test_any_calibration_count_gives_the_ranges_of_one_batch(tmp_path, method, count):
    """ORT's histogram calibrators stacked the batches' outputs and failed on a short last batch; the ranges of any
    count must be those of the whole set run as one batch."""
    model = _identity_conv_model(side=8)
    images = np.random.default_rng(count).normal(0.0, 1.0, size=(count, 2, 8, 8))
    calib_set = _set(images)
    got = _ranges(calibrate(model, calib_set, method, cache_dir=tmp_path / "batched"))
    whole = _ranges(calibrate(model, calib_set, method, cache_dir=tmp_path / "whole", batch_size=count))
    # Exact: the identity 1x1 conv passes every value through unrounded (x·1 plus zeros), and the histograms are built
    # once from all outputs stacked, so both see the same values whatever the batches.
    assert got == whole
    if method == "minmax":  # the float32 copy of the float64 images: one rounding, 6e-8 relative (approx: 1e-6)
        assert max(abs(v) for v in got["input"]) == pytest.approx(np.abs(images).max())


def _pack_faces(root, size=32):
    from PIL import Image

    from edgekd.data.recordio import pack_image_folder

    rng = np.random.default_rng(0)
    for i in range(12):
        folder = root / "faces" / f"id{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    pack_image_folder(root / "faces", root / "rec")
    return root / "rec"


def test_calibration_reads_recordio_in_every_spelling_data_takes(tmp_path, tiny_onnx):
    from edgekd.data import create_dataset
    from edgekd.data.transforms import normalize

    _, cfg = tiny_onnx
    folder = _pack_faces(tmp_path)
    dataset = create_dataset(str(folder))  # what `--data FOLDER` trains on
    expected = normalize(torch.stack([dataset[i][0] for i in range(len(dataset))]), cfg.mean, cfg.std).numpy()
    for spec in (str(folder), f"rec:{folder}", str(folder / "train.rec"), f"rec:{folder / 'train.rec'}"):
        got = build_calibration_set(spec, cfg, num_images=len(dataset))  # all of them: drawn in index order
        # exact: the same decoded uint8 images through the same normalize (elementwise, correctly rounded operations)
        np.testing.assert_array_equal(got.images, expected, err_msg=spec)


def test_unreadable_calibration_images_are_one_line_or_left_out_with_skip_bad(tmp_path, tiny_onnx):
    from edgekd.errors import DataError

    _, cfg = tiny_onnx
    folder = _pack_faces(tmp_path).parent / "faces"
    (folder / "id1" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError) as err:
        build_calibration_set(str(folder), cfg, num_images=13)
    message = str(err.value)
    assert "broken.jpg" in message and "--skip-bad" in message and "skip_bad=True" not in message, message
    # 13 asked, 13 files, one unreadable: the 12 readable ones; 5 asked: 5, whichever were drawn
    every = build_calibration_set(str(folder), cfg, num_images=13, skip_bad=True)
    assert len(every) == 12 and len(every.skipped) == 1 and "broken.jpg" in every.skipped[0]
    for seed in range(4):
        some = build_calibration_set(str(folder), cfg, num_images=5, seed=seed, skip_bad=True)
        assert len(some) == 5 and len(some.skipped) <= 1
