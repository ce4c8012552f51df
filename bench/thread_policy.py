"""Training step time under CPU thread policies, on a quiet machine and on one whose cores are busy.

Each (policy, load) cell runs in a fresh process, because OpenMP reads its wait policy once, when torch loads it.
The load is made here: ``--load`` busy Python processes (default one per usable CPU), started before the cell
and killed after it.
Rounds interleave every cell, so a slow minute of the machine touches all of them alike; the table gives the median
step time over rounds and the range.

    python -m bench.thread_policy --rounds 3 --write-md   # the numbers in BENCHMARKS.md ("Threads")
    python -m bench.thread_policy --demo                   # also `edgekd distill` (the demo) end to end

Policies: ``old`` is OpenMP's default wait policy (spin, then sleep) with torch's threads; ``passive`` always sets
``OMP_WAIT_POLICY=PASSIVE``; ``adaptive`` is edgekd's default (passive only when the machine is busy at start,
``edgekd.utils.threads.choose_wait_policy``); ``1-thread`` is one thread, passive; ``spin-*`` lower GNU OpenMP's
spin count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

POLICIES = {
    "old": {"env": {}, "threads": None},
    "passive": {"env": {"OMP_WAIT_POLICY": "PASSIVE"}, "threads": None},
    "1-thread": {"env": {"OMP_WAIT_POLICY": "PASSIVE"}, "threads": 1},
    # GNU OpenMP spins this many times at a barrier before it sleeps (default 300,000; PASSIVE means 0).
    # edgekd's default: passive only when other processes keep half a CPU busy at start (choose_wait_policy).
    "adaptive": {"env": {}, "threads": None, "adaptive": True},
    "spin-10k": {"env": {"GOMP_SPINCOUNT": "10000"}, "threads": None},
    "spin-1k": {"env": {"GOMP_SPINCOUNT": "1000"}, "threads": None},
}

# One cell: the demo's student step (MobileFaceNet, 32x32, batch 64, ArcFace over 200 classes), eager.
STEP_SCRIPT = r"""
import json, sys, time
if sys.argv[3] == "adaptive":
    from edgekd.utils.threads import choose_wait_policy
    choose_wait_policy()
import torch
threads = json.loads(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
from edgekd.bundle import Bundle
from edgekd.heads import create_head
from edgekd.losses import LossWeights
from edgekd.models import create_model
from edgekd.train.trainer import make_loss_fn
torch.manual_seed(0)
backbone = create_model("mbf", input_size=32)
student = Bundle(backbone=backbone, head=create_head("arcface", backbone.embed_dim, 200, s=16.0, m=0.3))
loss_fn = make_loss_fn(student, None, LossWeights(ce=1.0), "chunked")
params = [p for m in (student.backbone, student.head) for p in m.parameters()]
opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 200, (64,))
times = []
for i in range(int(sys.argv[2])):
    tic = time.perf_counter()
    total, _ = loss_fn(x, y, None)
    opt.zero_grad(); total.backward(); opt.step()
    times.append(time.perf_counter() - tic)
print(json.dumps({"times": times[2:], "threads": torch.get_num_threads()}))
"""


@contextlib.contextmanager
def load_of(n: int):
    """While active, ``n`` processes that each keep one CPU busy."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def policy_env(policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy]["env"])
    env["PYTHONPATH"] = str(ROOT)
    return env


def step_cell(policy: str, steps: int) -> dict:
    threads = json.dumps(POLICIES[policy]["threads"])
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            STEP_SCRIPT,
            threads,
            str(steps),
            "adaptive" if POLICIES[policy].get("adaptive") else "",
        ],
        env=policy_env(policy),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def demo_cell(policy: str, timeout: float) -> float | None:
    """Seconds of `edgekd distill` (the demo, teacher included, fresh cache), or None past ``timeout``."""
    threads = POLICIES[policy]["threads"]
    # The old policy: torch (and its OpenMP) loaded before edgekd's CLI could choose the wait policy.
    prelude = "import torch; " if policy == "old" else ""
    argv = ["distill", "--out", "OUT"] + (["--threads", str(threads)] if threads else [])
    with tempfile.TemporaryDirectory() as tmp:
        argv[2] = str(Path(tmp) / "run")
        code = f"{prelude}from edgekd.cli import main; main({argv!r})"
        env = {**policy_env(policy), "EDGEKD_CACHE_DIR": str(Path(tmp) / "cache")}
        tic = time.perf_counter()
        try:
            subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of the policies")
    parser.add_argument("--steps", type=int, default=8, help="steps per cell; the first 2 are warm-up")
    parser.add_argument("--load", type=int, default=len(os.sched_getaffinity(0)), help="busy processes when loaded")
    parser.add_argument("--demo", action="store_true", help="also time the demo end to end (minutes per cell)")
    parser.add_argument("--demo-timeout", type=float, default=900.0)
    parser.add_argument("--demo-policies", default="old,passive", help="policies timed end to end with --demo")
    parser.add_argument("--json", default="runs/bench/thread_policy.json")
    parser.add_argument("--write-md", action="store_true", help="print the BENCHMARKS.md rows")
    args = parser.parse_args()

    results: dict = {"steps": {}, "demo": {}, "load_processes": args.load, "cpus": len(os.sched_getaffinity(0))}
    for r in range(args.rounds):
        for load in ("quiet", "loaded"):
            for policy in args.policies.split(","):
                with load_of(args.load if load == "loaded" else 0):
                    cell = step_cell(policy, args.steps)
                key = f"{policy}/{load}"
                results["steps"].setdefault(key, []).append(statistics.median(cell["times"]))
                print(f"round {r + 1} {key}: {statistics.median(cell['times']) * 1e3:.0f} ms/step", flush=True)
    if args.demo:
        for load in ("quiet", "loaded"):
            for policy in args.demo_policies.split(","):
                with load_of(args.load if load == "loaded" else 0):
                    seconds = demo_cell(policy, args.demo_timeout)
                results["demo"][f"{policy}/{load}"] = seconds
                shown = f"{seconds:.0f} s" if seconds else f"> {args.demo_timeout:.0f} s (stopped)"
                print(f"demo {policy}/{load}: {shown}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.write_md:
        print(
            "\n| policy | quiet ms/step, median (range) | loaded ms/step, median (range) | demo quiet | demo loaded |"
        )
        print("|---|---|---|---|---|")
        for policy in args.policies.split(","):
            cells = []
            for load in ("quiet", "loaded"):
                xs = [t * 1e3 for t in results["steps"][f"{policy}/{load}"]]
                cells.append(f"{statistics.median(xs):.0f} ({min(xs):.0f}–{max(xs):.0f})")
            for load in ("quiet", "loaded"):
                seconds = results["demo"].get(f"{policy}/{load}", "n/a")
                cells.append(
                    seconds if isinstance(seconds, str) else f"{seconds / 60:.1f} min" if seconds else "stopped"
                )
            print(f"| {policy} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
