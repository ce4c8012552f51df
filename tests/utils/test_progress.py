"""Plain progress lines: printed at the start, once per interval, and at the end, with ETA from the rate so far."""

import io

from edgekd.utils.progress import LogLines, format_duration


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_log_lines_print_once_per_interval_with_eta():
    clock, stream = Clock(), io.StringIO()
    bar = LogLines(total=100, desc="train", unit="step", interval=30.0, stream=stream, clock=clock)
    for _ in range(10):  # 10 steps of 5 s: lines at 30 s only (the start line was at 0 s)
        clock.now += 5.0
        bar.update(1)
    bar.set_postfix(loss="1.234")
    clock.now += 25.0
    bar.update(1)  # 75 s since the start, 45 s since the last line: a line
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "train: 0/100 step (0%)  elapsed 0s"
    # At 30 s, 6 steps done at 5 s each: 94 left take 470 s.
    assert lines[1] == "train: 6/100 step (6%)  elapsed 30s  ETA 7m50s"
    assert lines[2] == "train: 11/100 step (11%)  loss 1.234  elapsed 1m15s  ETA 10m07s"
    assert lines[3].startswith("train: 11/100 step (11%)") and len(lines) == 4


def test_resumed_progress_counts_the_rate_from_where_it_started():
    clock, stream = Clock(), io.StringIO()
    bar = LogLines(total=10, desc="d", unit="step", initial=8, interval=1.0, stream=stream, clock=clock)
    clock.now = 2.0
    bar.update(1)
    assert stream.getvalue().splitlines()[-1] == "d: 9/10 step (90%)  elapsed 2s  ETA 2s"


def test_format_duration():
    assert [format_duration(s) for s in (0, 42, 312, 3720)] == ["0s", "42s", "5m12s", "1h02m"]


def test_eta_leaves_out_a_first_step_that_compiled():
    """The first compiled step can take a minute: from rate_from_here on, the ETA is the later steps' rate alone."""
    clock, stream = Clock(), io.StringIO()
    bar = LogLines(total=100, desc="train", unit="step", interval=30.0, stream=stream, clock=clock)
    clock.now = 60.0  # step 1 compiles for a minute
    bar.update(1)
    bar.rate_from_here()
    for _ in range(10):  # then 3 s a step: a line at 90 s
        clock.now += 3.0
        bar.update(1)
    # 10 steps in 30 s since the compile: 89 left take 267 s (averaging the compile in would say 9m33s).
    assert stream.getvalue().splitlines()[-1] == "train: 11/100 step (11%)  elapsed 1m30s  ETA 4m27s"
