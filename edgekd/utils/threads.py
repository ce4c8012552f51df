"""CPU thread policy of training and evaluation: how many torch threads, and how idle OpenMP threads wait.

On a machine whose cores are busy with other work, OpenMP threads that spin at barriers (GNU OpenMP's default
wait policy) steal the cores the one thread still working needs: a MobileFaceNet step went from 0.3 s to 3-4 s on
two loaded cores. Passive waiting (``OMP_WAIT_POLICY=PASSIVE``) puts idle threads to sleep instead. The policy must
be in the environment before torch loads its OpenMP runtime, so the CLI sets it first thing (``set_wait_policy``);
a value the user exported wins. BENCHMARKS.md ("Threads") has the measurements behind the default.
"""

from __future__ import annotations

import os

DEFAULT_WAIT_POLICY = "PASSIVE"


def set_wait_policy() -> None:
    """Put ``OMP_WAIT_POLICY`` in the environment unless the user chose one; call before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", DEFAULT_WAIT_POLICY)


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
