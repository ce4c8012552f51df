"""The CLI's wait-policy choice: passive OpenMP waits only on a busy machine, never over the user's own choice."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekd.utils.threads import busy_cpus

ROOT = Path(__file__).resolve().parents[2]

# A fresh interpreter without torch, as the CLI is when it chooses; busy_cpus is replaced by the given reading.
CHOOSE = """
import os, sys
import edgekd.utils.threads as threads
threads.busy_cpus = lambda interval=0.2: float(sys.argv[1])
print(threads.choose_wait_policy(), os.environ.get("OMP_WAIT_POLICY"))
"""


def choose(busy: float, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, "-c", CHOOSE, str(busy)],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.parametrize(
    "busy, env, expected",
    [
        (1.0, {}, "PASSIVE PASSIVE"),
        (0.1, {}, "None None"),
        (1.0, {"OMP_WAIT_POLICY": "ACTIVE"}, "None ACTIVE"),
        (1.0, {"GOMP_SPINCOUNT": "1000"}, "None None"),
    ],
)
def test_passive_waits_only_on_a_busy_machine_and_never_over_the_users_choice(busy, env, expected):
    assert choose(busy, **env) == expected


def test_busy_cpus_sees_a_process_that_keeps_a_cpu_busy():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cpus(0.5) >= 0.5
    finally:
        spinner.kill()
        spinner.wait()
