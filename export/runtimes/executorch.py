"""An ExecuTorch program (``.pte``) as a ``Runtime``: its ``forward`` method run by ExecuTorch's own C++ runtime (the
pybindings that ship with the ``executorch`` wheel, with the XNNPACK backend registered), on the CPU.

The input contract comes from the program itself: the shape of ``forward``'s input and output from the method's
metadata, and mean, std, input size and precision from the constant methods ``edgekd export --target executorch``
stores (the ONNX ``metadata_props`` keys and values, ``edgekd.export.builders.executorch``). A program without them is
read the way a foreign ONNX file is (``edgekd.export.contract``: insightface's conventions). A program fixes its batch
(edgekd's is 1): larger inputs run in chunks of it.

Threads: ExecuTorch has one process-wide thread pool, which XNNPACK binds to a method when the method is loaded;
its size can only be changed through the experimental ``_unsafe_reset_threadpool``, and a method loaded before a
reset then runs on a destroyed pool (measured with ExecuTorch 1.5.1: glibc aborts, or the process hangs, some 100 runs
later). So a runtime given ``threads`` resizes the pool to it when edgekd last sized it otherwise, and any runtime
reloads its method whenever the pool was replaced since it loaded it (``_Pool``). ExecuTorch is imported through
``edgekd.export.optional_deps``.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from edgekd.errors import EdgekdError
from edgekd.export.contract import contract_from_graph
from edgekd.export.optional_deps import import_executorch
from edgekd.export.runtimes.base import Runtime, as_tensor, check_image_shape, run_in_fixed_batches

__all__ = ["ExecuTorchRuntime", "read_program_metadata"]

FORWARD = "forward"


class _Pool:
    """ExecuTorch's thread pool as edgekd left it: how many times this process replaced it, and the size it gave it
    last (None: never, ExecuTorch's default). Kept here because asking the pool its size creates it, and that
    probes the CPU, printing on stderr (see the module docstring)."""

    generation = 0
    threads: int | None = None


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Hide what ExecuTorch's C++ runtime prints while a program loads or the pool is resized (cpuinfo's probing of
    ARM-only files, "Resetting threadpool", why a file is no program): lines a user cannot act on, or that the
    one-line error raised from the failure already says. Its log goes to file descriptor 2, or through the
    pybindings to ``sys.stderr``; both are hidden."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to hide
        yield
        return
    try:
        with tempfile.TemporaryFile() as sink, contextlib.redirect_stderr(io.StringIO()):
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _resize_pool(threads: int) -> None:
    """Give ExecuTorch's thread pool ``threads`` threads, unless edgekd already did (a replaced pool invalidates every
    loaded method: ``_Pool``)."""
    if _Pool.threads == threads:
        return
    with _native_stderr_silenced():
        import_executorch("executorch.extension.pybindings.portable_lib")._unsafe_reset_threadpool(int(threads))
    _Pool.threads = threads
    _Pool.generation += 1


def _load_program(data: bytes, name: str):
    runtime = import_executorch("executorch.runtime")
    try:
        with _native_stderr_silenced():
            return runtime.Runtime.get().load_program(data)
    except (RuntimeError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise EdgekdError(f"ExecuTorch cannot load {name}: {reason} (not a .pte program?)") from None


def read_program_metadata(program) -> dict[str, str]:
    """The string-valued constant methods of a loaded program: edgekd's metadata (``model_metadata``'s keys)."""
    meta = {}
    for method in sorted(program.method_names - {FORWARD}):
        meta_info = program.metadata(method)
        if meta_info.num_inputs() != 0 or meta_info.num_outputs() != 1:
            continue
        value = program.load_method(method).execute([])
        if len(value) == 1 and isinstance(value[0], str):
            meta[method] = value[0]
    return meta


class ExecuTorchRuntime(Runtime):
    """An ExecuTorch ``.pte`` program's ``forward``, run by ExecuTorch's C++ runtime on the CPU."""

    backend = "executorch"
    device = "cpu"

    def __init__(
        self, program: str | os.PathLike | bytes, threads: int | None = None, precision: str | None = None
    ) -> None:
        """Open a program.

        Args:
            program: a ``.pte`` path or its bytes.
            threads: the size of ExecuTorch's (process-wide) thread pool while this runtime runs; None: leave it as
                it is (ExecuTorch starts with one thread per core).
            precision: label for reports (default: the program's ``precision`` metadata).
        """
        self.name = "the program" if isinstance(program, bytes) else Path(program).name
        self.data = program if isinstance(program, bytes) else Path(program).read_bytes()
        self.threads = threads
        loaded = _load_program(self.data, self.name)
        if FORWARD not in loaded.method_names:
            raise EdgekdError(f"{self.name} has no {FORWARD} method; it is not a model program")
        meta_info = loaded.metadata(FORWARD)
        if meta_info.num_inputs() != 1 or meta_info.num_outputs() < 1:
            raise EdgekdError(
                f"{self.name}'s {FORWARD} takes {meta_info.num_inputs()} inputs; an image model takes one"
            )
        input_shape = list(meta_info.input_tensor_meta(0).sizes())
        output_shape = list(meta_info.output_tensor_meta(0).sizes())
        self.metadata = read_program_metadata(loaded)
        self.contract = contract_from_graph(input_shape, output_shape, self.metadata)
        self.precision = precision or self.metadata.get("precision") or "fp32"
        self.notes: list[str] = []  # one-line findings about the model a command should show the user
        self.set_contract(self.contract)
        self._program, self._generation, self._method = loaded, _Pool.generation, None

    def _forward_method(self):
        """``forward``, loaded under the current thread pool (resized to ``threads`` first when they are given); a
        program keeps the methods it has loaded, so a replaced pool needs the program loaded anew."""
        if self.threads:
            _resize_pool(self.threads)
        if self._generation != _Pool.generation:
            self._program, self._method = _load_program(self.data, self.name), None
            self._generation = _Pool.generation
        if self._method is None:
            with _native_stderr_silenced():  # XNNPACK's first initialization probes the CPU
                self._method = self._program.load_method(FORWARD)
        return self._method

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self._forward_method().execute([x.contiguous()])[0]
        except RuntimeError as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise EdgekdError(f"ExecuTorch failed on {self.name} at batch {len(x)}: {reason}") from None
        return out.float()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_shape(x, self.contract.graph_size, self.name)
        return run_in_fixed_batches(self._run, x, self.contract.batch)

    def prepare(self, x: torch.Tensor) -> Callable[[], Any]:
        x = as_tensor(x).contiguous()
        check_image_shape(x, self.contract.graph_size, self.name)
        if self.contract.batch is not None and len(x) != self.contract.batch:
            raise EdgekdError(f"{self.name} has a fixed batch of {self.contract.batch}; it cannot time batch {len(x)}")
        method, inputs = self._forward_method(), [x]
        return lambda: method.execute(inputs)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "threads": self.threads}
