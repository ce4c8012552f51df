"""What one worker subprocess of bench/shared_head_loss.py runs on one (case, B, D, C): every provider built and
warmed up, then interleaved timing rounds and/or one memory-measured step per provider (the method is in
shared_head_loss.py's docstring)."""

from __future__ import annotations

import os
import re
import time

import torch

from bench.shared_head_loss_providers import clear_grads, fits, make_inputs, make_step


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Peak memory above what was allocated before ``fn()`` ran (shared_head_loss.py's docstring: the CPU caveat)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _rss("VmRSS")
    fn()
    return _rss("VmHWM") - base


def time_ms(fn, device: torch.device, runs: int, before=lambda: None) -> list[float]:
    """Wall (CPU) or CUDA-event (GPU) milliseconds of ``runs`` calls of ``fn``; ``before()`` runs untimed."""
    times = []
    for _ in range(runs):
        before()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def rotated(items: list, r: int) -> list:
    """``items`` starting at position ``r`` (mod its length): round ``r``'s provider order."""
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _ready_steps(spec: dict, x: dict, device: torch.device) -> tuple[dict, dict]:
    """Each provider's step, or its note when it does not apply, does not fit or fails to build."""
    steps, notes = {}, {}
    dtype = getattr(torch, spec["dtype"])
    for provider in spec["providers"]:
        if not fits(provider, spec["case"], spec["B"], spec["D"], spec["C"], dtype, device):
            notes[provider] = "skipped: does not fit"
            continue
        try:
            step = make_step(provider, spec["case"], x, spec.get("compile_backend", "inductor"))
        except Exception as exc:  # a provider that cannot be built is a row note, not the end of the sweep
            step = f"failed: {_first_line(exc)}"
        if isinstance(step, str):
            notes[provider] = step
        else:
            steps[provider] = step
    return steps, notes


def _warm_up(steps: dict, notes: dict, x: dict, warmup: int) -> tuple[dict, dict]:
    """Run each step ``warmup`` times (compilation happens here); drop the ones that fail.

    Returns the seconds all warm-up steps took and the seconds of the last one (the step time to plan rounds by).
    """
    total, last = {}, {}
    sync = torch.cuda.synchronize if x["z_s"].is_cuda else (lambda: None)
    for provider in list(steps):
        t0 = time.perf_counter()
        try:
            for _ in range(max(1, warmup)):
                clear_grads(x)
                t_last = time.perf_counter()
                steps[provider]()
                sync()
        except Exception as exc:
            notes[provider] = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else _first_line(exc)
            del steps[provider]
            if x["z_s"].is_cuda:
                torch.cuda.empty_cache()
            continue
        total[provider] = round(time.perf_counter() - t0, 2)
        last[provider] = time.perf_counter() - t_last
    return total, last


def runs_per_round(step_s: float, rounds: int, runs: int, max_seconds: float | None) -> int:
    """``runs``, or fewer (at least 1) so that ``rounds`` rounds of a provider take about ``max_seconds``."""
    if not max_seconds or step_s <= 0:
        return runs
    return max(1, min(runs, int(max_seconds / (rounds * step_s))))


def _timing_rounds(steps: dict, notes: dict, x: dict, device: torch.device, rounds: int, runs: dict) -> dict:
    """Per-provider millisecond samples of ``rounds`` interleaved rounds of ``runs[provider]`` steps each."""
    samples = {p: [] for p in steps}
    for r in range(rounds):
        for provider in rotated(list(samples), r):
            if provider in notes:
                continue
            try:
                samples[provider] += time_ms(steps[provider], device, runs[provider], lambda: clear_grads(x))
            except Exception as exc:
                notes[provider] = _first_line(exc)
    return {p: s for p, s in samples.items() if p not in notes}


def _memory_pass(steps: dict, notes: dict, x: dict, device: torch.device) -> dict:
    """Peak extra bytes of one step per provider, each provider already warmed up."""
    peaks = {}
    for provider, step in steps.items():
        if provider in notes:
            continue
        clear_grads(x)  # the gradients count as extra memory
        try:
            peaks[provider] = peak_extra_bytes(step, device)
        except Exception as exc:
            notes[provider] = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else _first_line(exc)
    return peaks


def worker(kinds: set[str], spec: dict) -> dict:
    """Run in a subprocess: time and/or memory of every provider on one (case, B, D, C). Returns per-provider
    ``{"samples": [...], "warmup_s": s}``, ``{"peak": bytes}`` or ``{"note": why}``.

    ``spec["max_seconds"]`` (optional) caps a provider's timing rounds at about that many seconds by running fewer
    steps per round (at least one), so a slow provider does not take a GPU run's time budget.
    """
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    x = make_inputs(spec["case"], spec["B"], spec["D"], spec["C"], dtype, device)
    steps, notes = _ready_steps(spec, x, device)
    warm, step_s = _warm_up(steps, notes, x, spec["warmup"] if "time" in kinds else 1)
    runs = {p: runs_per_round(s, spec["rounds"], spec["runs"], spec.get("max_seconds")) for p, s in step_s.items()}
    samples = _timing_rounds(steps, notes, x, device, spec["rounds"], runs) if "time" in kinds else {}
    peaks = _memory_pass(steps, notes, x, device) if "memory" in kinds else {}
    out = {}
    for provider in spec["providers"]:
        if provider in notes:
            out[provider] = {"note": notes[provider]}
            continue
        out[provider] = {"warmup_s": warm.get(provider)}
        if provider in samples:
            out[provider]["samples"] = samples[provider]
        if provider in peaks:
            out[provider]["peak"] = peaks[provider]
    return out
