"""``read_metrics`` on the metrics.jsonl a killed run leaves: the training loop appends one line per logged step, so a
kill can cut only the last line short. That line is skipped (the report, loss.png and ``edgekd compare`` read the
steps that were logged); a damaged line before it is no kill's doing and is a one-line error naming file and line."""

import json
import shutil

import pytest

from edgekd.errors import EdgekdError
from edgekd.train.curves import plot_loss_curves, read_metrics

STEPS = [
    {"step": 1, "loss": 2.5, "ce": 2.5, "lr": 0.1},
    {"step": 2, "accuracy": {"synthetic": 0.75}},  # a verification line (--eval-every) shares the file
    {"step": 3, "loss": 1.25, "ce": 1.25, "lr": 0.05},
]


def _write(path, text: str):
    path.write_text(text)
    return path


def _lines(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.mark.parametrize("torn", ['{"step": 4, "lo', '{"step": 4, "loss": 1.1', "{", "\0\0\0\0"])
def test_a_last_line_cut_short_by_a_kill_is_skipped(tmp_path, torn):
    path = _write(tmp_path / "metrics.jsonl", _lines(STEPS) + torn)
    assert read_metrics(path) == STEPS


def test_a_whole_file_reads_as_written_blank_lines_aside(tmp_path):
    path = _write(tmp_path / "metrics.jsonl", _lines(STEPS[:1]) + "\n" + _lines(STEPS[1:]))
    assert read_metrics(path) == STEPS


@pytest.mark.parametrize(
    ("line", "text"),
    [(2, '{"step": 2, "acc\n'), (1, "[1, 2]\n"), (3, "not json\n")],
    ids=["cut short", "not an object", "not json"],
)
def test_a_damaged_line_before_the_last_is_a_one_line_error_naming_file_and_line(tmp_path, line, text):
    rows = _lines(STEPS).splitlines(keepends=True)
    rows.insert(line - 1, text)
    path = _write(tmp_path / "metrics.jsonl", "".join(rows))
    with pytest.raises(EdgekdError) as err:
        read_metrics(path)
    message = str(err.value)
    assert "\n" not in message and f"{path}, line {line}:" in message, message


def test_loss_curves_of_a_killed_run_are_drawn(tmp_path):
    path = _write(tmp_path / "metrics.jsonl", _lines(STEPS) + '{"step": 4, "lo')
    plot_loss_curves({"student": path}, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- what --resume makes of a killed run's log ---------------------------------------------------------------------

DATA = "synthetic:identities=8,images_per_identity=4,image_size=16,pairs=40,pair_identities=20,pair_images=4"
TEACHER = ["teacher", "--data", DATA, "--model", "r_tiny", "--batch-size", "8", "--device", "cpu", "--no-compile",
           "--workers", "0", "--steps", "3", "--log-every", "1"]  # fmt: skip


def _killed_at_step_2(out, run_cli, before_its_first_checkpoint: bool):
    """The folder of a run killed while it logged step 3: steps 1 and 2 logged, the line of step 3 cut short, and the
    checkpoint of step 2 (none when the kill came before its first checkpoint)."""
    code, _, err = run_cli([*TEACHER, "--stop-after", "2", "--out", str(out)])
    assert code == 0, err
    if before_its_first_checkpoint:
        shutil.rmtree(out / "checkpoints")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "time": "2026-01-01T00:0')


@pytest.mark.parametrize("before_its_first_checkpoint", [False, True], ids=["after a checkpoint", "before any"])
def test_a_resumed_killed_run_logs_each_step_once_and_reports(tmp_path, run_cli, before_its_first_checkpoint):
    out = tmp_path / "teacher"
    _killed_at_step_2(out, run_cli, before_its_first_checkpoint)
    code, stdout, err = run_cli(["teacher", "--out", str(out), "--resume"])
    assert code == 0, err
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3]  # no line of lost work, none cut short
    assert json.loads((out / "report.json").read_text())["losses"]["teacher"]["step"] == 3
