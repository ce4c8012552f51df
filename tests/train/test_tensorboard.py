"""``--tensorboard``: the scalars of metrics.jsonl (losses, lr, images/s, verification) as TensorBoard events, read
back with TensorBoard's own reader; a resumed run shows each step once; without the package, a one-line error
before anything is written."""

from __future__ import annotations

import json
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from edgekd.train.checkpoint import checkpoint_path, latest_checkpoint
from edgekd.train.tensorboard_log import TENSORBOARD_DIR

DATA = "synthetic:identities=8,images_per_identity=4,image_size=16,pairs=40,pair_identities=8"
RUN = ["teacher", "--data", DATA, "--model", "r_tiny", "--batch-size", "8", "--steps", "3", "--device", "cpu",
       "--no-compile", "--log-every", "1"]  # fmt: skip


def _expected(run_dir) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers by the tag each should have, as ``(step, value)`` in step order."""
    tags: dict[str, list[tuple[int, float]]] = {}
    for line in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if "verify" in line:
            numbers = {f"verify/{name}": value for name, value in line["verify"].items()}
            numbers["verify/mean"] = line["verify_mean"]
        else:
            numbers = {f"train/{key}": value for key, value in line.items() if key not in ("step", "time")}
        for tag, value in numbers.items():
            tags.setdefault(tag, []).append((line["step"], value))
    return tags


def _events(run_dir) -> dict[str, list[tuple[int, float]]]:
    """The scalars TensorBoard reads from the run's event files."""
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _float32(tags: dict) -> dict:
    """Values as TensorBoard keeps them: rounded to float32."""
    return {tag: [(step, float(np.float32(value))) for step, value in pairs] for tag, pairs in tags.items()}


def test_the_logged_scalars_are_tensorboard_events_at_the_same_steps(tmp_path, run_cli):
    out = tmp_path / "run"
    code, _, err = run_cli([*RUN, "--tensorboard", "--eval-every", "3", "--out", str(out)])
    assert code in (0, None), err
    expected = _expected(out)
    assert {"train/loss", "train/ce", "train/lr", "train/images_per_s", "verify/mean"} <= expected.keys()
    assert [step for step, _ in expected["train/loss"]] == [1, 2, 3]
    assert [step for step, _ in expected["verify/mean"]] == [3]
    assert _events(out) == _float32(expected)


def test_a_resumed_run_shows_each_step_once(tmp_path, run_cli):
    """Step 3 is logged, then lost (its checkpoint and the teacher file removed, as if the run was killed before it
    wrote them); the resumed run takes step 3 again: metrics.jsonl drops the lost line and TensorBoard purges the
    lost events."""
    out = tmp_path / "run"
    code, _, err = run_cli([*RUN, "--checkpoint-every", "2", "--tensorboard", "--out", str(out)])
    assert code in (0, None), err
    checkpoint_path(out, 3).rename(tmp_path / "lost")
    (out / "teacher.safetensors").unlink()
    assert latest_checkpoint(out) == checkpoint_path(out, 2)
    code, _, err = run_cli(["teacher", "--out", str(out), "--resume"])
    assert code in (0, None), err
    assert len(list((out / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2  # one per invocation
    assert [step for step, _ in _expected(out)["train/loss"]] == [1, 2, 3]
    assert _events(out) == _float32(_expected(out))


def test_without_the_tensorboard_package_it_is_a_one_line_error_before_anything_is_written(
    tmp_path, run_cli, one_line, monkeypatch
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import now fails as without the package
    out = tmp_path / "run"
    code, _, err = run_cli([*RUN, "--tensorboard", "--out", str(out)])
    one_line(code, err, "--tensorboard", "pip install 'edgekd[tensorboard]'")
    assert not out.exists()
