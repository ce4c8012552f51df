"""CPU thread policy of training and evaluation: how many torch threads, and how idle OpenMP threads wait.

On a machine whose cores are busy with other work, OpenMP threads that spin at barriers (GNU OpenMP's default
wait policy) steal the cores the one thread still working needs: a MobileFaceNet step went from 0.33 s to 1.3-8 s
with two busy processes on two cores. Passive waiting (``OMP_WAIT_POLICY=PASSIVE``) puts idle threads to sleep
and holds the step at 0.6-0.9 s there, but on a quiet machine it made `make demo` 65 % slower (174 vs 105 s), since
every barrier then wakes a sleeping thread. So the CLI looks before it chooses: when other processes keep at
least half a CPU busy while edgekd starts, it sets passive waits; otherwise it leaves OpenMP's default. The policy
must be in the environment before torch loads its OpenMP runtime, so the CLI decides first thing
(``choose_wait_policy``); a value the user exported wins. BENCHMARKS.md ("Threads") has the measurements.
"""

from __future__ import annotations

import os
import sys
import time

# Other processes' CPU use (in CPUs) at start from which idle OpenMP threads sleep instead of spinning.
BUSY_CPUS_FOR_PASSIVE = 0.5
SAMPLE_S = 0.2


def busy_cpus(interval: float = SAMPLE_S) -> float | None:
    """CPUs kept busy by every process on the machine over ``interval`` seconds (``/proc/stat``); None off Linux."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return 0.0
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def choose_wait_policy() -> str | None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when the machine is busy at start; returns the policy set, or None.

    Leaves the environment alone when the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``, and when torch is
    already imported (its OpenMP runtime has read the environment then: in-process callers such as tests).
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ or "torch" in sys.modules:
        return None
    busy = busy_cpus()
    if busy is not None and busy >= BUSY_CPUS_FOR_PASSIVE:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return "PASSIVE"
    return None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """Use ``threads`` torch intra-op threads (default: the usable CPUs); returns the number set."""
    import torch

    n = threads or usable_cpus()
    torch.set_num_threads(n)
    return n
