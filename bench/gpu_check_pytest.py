"""The pytest plugin of gpu-check's gpu_tests stage (``pytest -p bench.gpu_check_pytest``, the repository root on
PYTHONPATH): which tests run, a time limit per test, and each test's result written the moment it is known.

A GPU machine is lent for minutes, so a stage that runs out of time must still say what passed, and one test that
hangs (an NCCL collective, a CUDA synchronization) must not take the rest with it. pytest-timeout and junit XML do
neither here: the GPU image has no pytest-timeout, and junit XML is written only when the session ends.

- ``--gpu-check-results FILE``: one JSON line per test as it starts (``outcome`` ``running``) and one as it ends
  (``passed``, ``failed``, ``error`` or ``skipped``, seconds, the first line of the failure, recorded properties),
  written by the process that reports (the controller under pytest-xdist) and flushed line by line;
  ``read_results`` in gpu_check_stages folds them.
- ``--gpu-check-timeout SECONDS``: past it a test's body gets ``TestTimeout`` (SIGALRM, main thread), which fails
  it; a test stuck where Python cannot interrupt it (inside a C call) has the process it runs in dumped and ended by
  faulthandler at ``hard_limit``: under pytest-xdist the worker dies, the test is reported as crashed and a new
  worker takes the next tests; alone, pytest ends and the stage records that test as still running.
- ``--gpu-check-also PATH``: besides the ``gpu``-marked tests (the only ones selected otherwise), the tests of the
  file PATH (relative to the root folder) that are not marked ``slow``: the dry run's CPU variants of the tests of
  what a GPU breaks first.
"""

from __future__ import annotations

import faulthandler
import json
import signal
import sys
import threading
from pathlib import Path

import pytest


class TestTimeout(Exception):
    """A test ran past ``--gpu-check-timeout``."""


def hard_limit(seconds: float) -> float:
    """When faulthandler ends a process whose test ignored ``TestTimeout``: a quarter of the limit and 1 s after."""
    return 1.25 * seconds + 1.0


def pytest_addoption(parser) -> None:
    group = parser.getgroup("gpu-check")
    group.addoption("--gpu-check-results", metavar="FILE", help="append each test's start and result (JSON lines)")
    group.addoption("--gpu-check-timeout", type=float, metavar="SECONDS", help="time limit per test")
    group.addoption("--gpu-check-also", metavar="PATH", help="also select this file's tests not marked slow")


def pytest_configure(config) -> None:
    results = config.getoption("gpu_check_results")
    if results and not hasattr(config, "workerinput"):  # pytest-xdist workers report to the controller, which writes
        config.pluginmanager.register(ResultsFile(Path(results)), "gpu_check_results")
    seconds = config.getoption("gpu_check_timeout")
    if seconds:
        config.pluginmanager.register(TimeLimit(seconds), "gpu_check_timeout")


def pytest_collection_modifyitems(config, items) -> None:
    """Keep the ``gpu``-marked tests, and those of ``--gpu-check-also`` that are not marked slow."""
    also = config.getoption("gpu_check_also")

    def wanted(item) -> bool:
        if item.get_closest_marker("gpu"):
            return True
        return bool(also) and item.nodeid.startswith(also + "::") and not item.get_closest_marker("slow")

    kept = [item for item in items if wanted(item)]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if not wanted(item)])
        items[:] = kept


class ResultsFile:
    """``--gpu-check-results``: a test's line when it starts, and its result once its last phase is reported."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", buffering=1)  # line-buffered: each line reaches the file whole, at once
        self.cases: dict[str, dict] = {}

    def write(self, entry: dict) -> None:
        self.file.write(json.dumps(entry, default=str) + "\n")

    def pytest_runtest_logstart(self, nodeid, location) -> None:
        self.write({"test": nodeid, "outcome": "running"})

    def pytest_runtest_logreport(self, report) -> None:
        case = self.cases.setdefault(report.nodeid, {"test": report.nodeid, "outcome": "passed", "seconds": 0.0,
                                                     "message": "", "properties": {}})  # fmt: skip
        case["seconds"] = round(case["seconds"] + report.duration, 3)
        case["properties"].update(dict(report.user_properties))
        if case["outcome"] == "passed" and not report.passed:
            crashed_or_call = report.when not in ("setup", "teardown")  # "???": pytest-xdist's crashed worker
            case["outcome"] = "skipped" if report.skipped else "failed" if crashed_or_call else "error"
            case["message"] = outcome_message(report)
        # teardown is a test's last phase; pytest-xdist reports a crashed worker's test in a phase of its own ("???")
        if report.when not in ("setup", "call"):
            self.write(self.cases.pop(report.nodeid))

    def pytest_unconfigure(self) -> None:
        self.file.close()


def outcome_message(report) -> str:
    """The first line of why a test failed or skipped (what junit XML puts in its ``message``)."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (path, line, reason)
        text = longrepr[2]
    elif hasattr(longrepr, "reprcrash") and longrepr.reprcrash is not None:
        text = longrepr.reprcrash.message
    else:
        text = str(longrepr or "")
    text = text.strip()
    return text.splitlines()[0][:300] if text else ""


class TimeLimit:
    """``--gpu-check-timeout``: ``TestTimeout`` in the test's body, then faulthandler for the whole test."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        # Output capture leaves sys.__stderr__ alone only with --capture=sys (the stage's choice): the dump then
        # lands in the stage's log.
        faulthandler.dump_traceback_later(hard_limit(self.seconds), exit=True, file=sys.__stderr__)
        try:
            return (yield)
        finally:
            faulthandler.cancel_dump_traceback_later()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            return (yield)

        def expire(signum, frame):
            raise TestTimeout(f"over gpu-check's per-test limit of {self.seconds:g} s")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        try:
            return (yield)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
