"""The environment a result was measured in: package versions, device, threads. Every JSON edgekd writes embeds it.

Versions are read from installed package metadata, so optional packages (TensorRT, Triton, ONNX Runtime) are never
imported just to be reported; only torch is imported, because the device and thread count come from it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from edgekd.version import __version__

__all__ = [
    "environment", "package_versions", "cpu_name", "gpu_info", "thread_info", "onnxruntime_conflict", "source_commit",
]  # fmt: skip

# distribution names; the first one installed under each key wins (onnxruntime ships as -gpu on Linux x86).
PACKAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "numpy": ("numpy",),
    "onnx": ("onnx",),
    "onnxscript": ("onnxscript",),
    "onnxruntime": ("onnxruntime-gpu", "onnxruntime"),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"),
    "torch_tensorrt": ("torch-tensorrt", "torch_tensorrt"),
    "triton": ("triton",),
    "timm": ("timm",),
}


def package_versions() -> dict[str, str | None]:
    """Installed versions of edgekd's required and optional packages (None when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "edgekd": __version__}
    for key, dists in PACKAGES.items():
        versions[key] = None
        for dist in dists:
            try:
                versions[key] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict[str, Any] | None:
    """Name, compute capability, memory and CUDA version of the current CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {
        "index": index,
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "device_count": torch.cuda.device_count(),
    }


def thread_info() -> dict[str, int | None]:
    """torch intra-op threads, the CPUs this process may run on, and the machine's logical CPU count."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "usable_cpus": usable,
        "logical_cpus": os.cpu_count(),
        "omp_num_threads": int(os.environ["OMP_NUM_THREADS"])
        if os.environ.get("OMP_NUM_THREADS", "").isdigit()
        else None,
    }


def source_commit(root: str | os.PathLike | None = None) -> str | None:
    """The git commit of the checkout at ``root`` (default: the one edgekd is imported from), ``+dirty`` appended
    when tracked files differ from it; None outside a git checkout or without git."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def environment(**extra: Any) -> dict[str, Any]:
    """Versions, device and threads, plus any ``extra`` keys (e.g. the ORT thread count a benchmark used).

    Returns:
        A JSON-serializable dict with keys ``versions``, ``platform``, ``cpu``, ``gpu`` (None without CUDA),
        ``threads`` and the extras.
    """
    env = {
        "versions": package_versions(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "gpu": gpu_info(),
        "threads": thread_info(),
    }
    env.update(extra)
    return env


def onnxruntime_conflict() -> str | None:
    """A one-line fix when both ONNX Runtime distributions are installed, else None.

    ``onnxruntime`` and ``onnxruntime-gpu`` install the same ``onnxruntime/`` package, so whichever came last wins
    file by file (insightface, for one, pulls in the CPU build beside ``edgekd[gpu]``), and ``pip check`` stays quiet.
    """
    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            installed.append(dist)
        except metadata.PackageNotFoundError:
            continue
    if len(installed) < 2:
        return None
    return (
        "onnxruntime and onnxruntime-gpu are both installed and overwrite each other's files; keep one: "
        "`pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu` (or onnxruntime for CPU only)"
    )
