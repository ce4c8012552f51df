"""The default teacher and the vanilla baseline are cached by what they train, not by where or how fast."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest

from edgekd.cli.distill import SETTINGS as DISTILL_SETTINGS
from edgekd.cli.teacher import SETTINGS as TEACHER_SETTINGS
from edgekd.distill.pipeline import _cached_run
from edgekd.distributed.launch import ONE_PROCESS
from edgekd.train.config import RUNTIME_SETTINGS, TrainConfig


class _Data:
    fingerprint = "data-0"


def _cache(cfg: TrainConfig, trained: list) -> tuple:
    def train(run_dir):
        trained.append(run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "teacher.safetensors").write_bytes(b"weights")
        return run_dir / "teacher.safetensors"

    return _cached_run("teachers", "teacher.safetensors", cfg, _Data(), train, ONE_PROCESS)


def test_a_run_that_differs_only_in_runtime_settings_reuses_the_cached_model(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKD_CACHE_DIR", str(tmp_path))
    trained: list = []
    cfg = TrainConfig(model="r_tiny", epochs=1)
    path, fresh = _cache(cfg, trained)
    runtime = {"device": "cpu", "num_workers": 2, "compile": False, "loss_backend": "chunked"}
    runtime |= {"teacher_cache": False, "checkpoint_every": 7, "keep_checkpoints": 1, "log_every": 3, "stop_after": 5}
    runtime |= {"eval_every": 4, "tensorboard": True}
    assert runtime.keys() == RUNTIME_SETTINGS
    again, fresh_again = _cache(replace(cfg, **runtime), trained)
    assert fresh and not fresh_again and again == path and len(trained) == 1
    for change in ({"lr": 0.05}, {"seed": 1}, {"epochs": 2.0}, {"model_kwargs": {"embed_dim": 64}}, {"amp": "fp16"}):
        other, fresh_other = _cache(replace(cfg, **change), trained)
        assert fresh_other and other != path, change


def test_models_cached_before_the_newer_settings_are_found_again(tmp_path, monkeypatch):
    """--sample-rate, --warmup-epochs and --amp came after the cache: at the values that train what edgekd trained
    before them, a run finds the folder the previous code (be28e0d) keyed (its keys, computed by that code), and at
    any other value a folder of its own."""
    monkeypatch.setenv("EDGEKD_CACHE_DIR", str(tmp_path))
    before = {"7f26af8aa3b044a2": TrainConfig(model="r_tiny", epochs=1), "fe92c4fb0bd6dc59": TrainConfig(lr=0.05,
              warmup_steps=3)}  # fmt: skip
    for key, cfg in before.items():
        path, _ = _cache(cfg, [])
        assert path.parent.name == key
        for change in ({"sample_rate": 0.5}, {"warmup_epochs": 0.0}, {"amp": "bf16"}):
            assert _cache(replace(cfg, **change), [])[0].parent.name != key, change


@pytest.mark.parametrize("settings", [DISTILL_SETTINGS, TEACHER_SETTINGS], ids=["distill", "teacher"])
def test_the_settings_a_resumed_run_may_change_are_the_runtime_settings(settings):
    """One list: what --resume lets a run change is what the cache of trained models ignores."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    resumable = {s.key for s in settings if s.key in fields and s.resumable}
    assert resumable == RUNTIME_SETTINGS & {s.key for s in settings}
