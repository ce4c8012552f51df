"""The ``edgekd`` command line: a click group whose subcommands live one per module in this package.

User errors (``EdgekdError``) are printed as one line and exit with status 2; no traceback.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path

import click

from edgekd.errors import EdgekdError, EdgekdWarning, TrainingInterrupted
from edgekd.utils.threads import choose_wait_policy
from edgekd.version import __version__

# Subcommand name -> module defining ``command``; imported only when that subcommand runs, so
# `edgekd --help` stays fast and optional dependencies load late.
SUBCOMMANDS = {
    "teacher": "edgekd.cli.teacher",
    "distill": "edgekd.cli.distill",
    "eval": "edgekd.cli.eval",
    "compare": "edgekd.cli.compare",
    "export": "edgekd.cli.export",
    "benchmark-latency": "edgekd.cli.benchmark_latency",
    "data": "edgekd.cli.data",
    "study": "edgekd.cli.study",
}

SUMMARIES = {
    "teacher": "Train or fine-tune a teacher (--student-head for an SH-KD student-aware teacher).",
    "distill": "Train a student: vanilla, kd, l2e, th-kd or sh-kd (default: built-in identities, TH-KD).",
    "eval": "Verification / classification accuracy of a checkpoint, ONNX file or engine.",
    "compare": "Two runs side by side: settings that differ, final losses, verification metrics and their difference.",
    "export": "Export a student to ONNX (FP32/FP16/INT8) or a TensorRT engine, behind parity gates.",
    "benchmark-latency": "Latency and throughput of torch, ONNX Runtime and TensorRT over a batch sweep.",
    "data": "Pack image folders into insightface RecordIO / .bin files.",
    "study": "Reproduction study: every method over seeds on Fashion-MNIST and synthetic faces -> REPRODUCTION.md.",
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when it is invoked or its help is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        try:
            module = importlib.import_module(SUBCOMMANDS[name])
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("edgekd.cli"):
                return None
            raise
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SUMMARIES[name]) for name in SUBCOMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="edgekd")
def cli() -> None:
    """edgekd: classifier-sharing knowledge distillation for edge face and image models."""


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run: the user's own, plus ``--resume`` where the command
    has that option (``study`` continues by being rerun as it was)."""
    args = list(argv)
    if "--resume" not in args and _accepts_resume(args):
        args.append("--resume")
    return shlex.join(["edgekd", *args])


def _accepts_resume(args: list[str]) -> bool:
    # The group itself has only --help/--version, so the first word that is not an option names the subcommand.
    name = next((arg for arg in args if not arg.startswith("-")), None)
    command = cli.get_command(click.Context(cli), name) if name else None
    return command is not None and any("--resume" in param.opts for param in command.params)


def _disk_full(exc: BaseException) -> str | None:
    """One line for an exception (or its cause) that says the disk or quota is full, else None. Writers here are
    atomic (a temporary, then a rename), so what was written before stays whole and the run can be resumed."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" while writing {seen.filename}" if seen.filename else ""
            break
        # safetensors and some torch writers wrap the OS error in their own type, keeping only its text.
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            where = ""
            break
        seen = seen.__cause__ or seen.__context__
    else:
        return None
    return (
        f"the disk is full{where}; nothing half-written was kept: free some space, then rerun the command "
        "(a training run continues from its last checkpoint with --resume)"
    )


def _after_abort(args: list[str]) -> str:
    """What to do after Ctrl-C: resume where a run folder with settings remains, else rerun (a run stopped before
    its first checkpoint leaves no folder behind, ``run_folder.undo_if_nothing_made``)."""
    from edgekd.cli.options import SETTINGS_FILE  # start-up time: options imports torch; only an abort needs it

    if not _accepts_resume(args):
        return ""
    out = _option_value(args, "--out")
    if out is None or (Path(out) / SETTINGS_FILE).is_file():
        return f"; continue from the newest checkpoint with: {resume_command(args)}"
    return f"; nothing was saved in {shlex.quote(out)}; rerun the command to start again"


def _option_value(args: list[str], option: str) -> str | None:
    """The value given to ``option`` (``--out X`` or ``--out=X``; the last one wins), None when not given."""
    value = None
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(option + "="):
            value = arg[len(option) + 1 :]
    return value


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """edgekd's own warnings as one line ``edgekd: warning: ...``; others as Python prints them."""
    if issubclass(category, EdgekdWarning):
        click.echo(f"edgekd: warning: {message}", err=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _rank_prefix() -> str:
    """``[rank 1] `` in a process torchrun started as one rank of several (their errors interleave); else nothing."""
    rank, size = os.environ.get("RANK"), os.environ.get("WORLD_SIZE", "1")
    return f"[rank {rank}] " if rank is not None and size.isdigit() and int(size) > 1 else ""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the group and turns ``EdgekdError`` into one line on stderr, exit 2.

    A training run stopped by SIGINT/SIGTERM prints the step it saved and the command that resumes it, and exits
    128 + the signal number (130, 143), as a process killed by that signal would.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    # Before any subcommand imports torch: its OpenMP runtime reads the wait policy once, when it loads.
    if args and "--help" not in args:
        choose_wait_policy()
    warnings.showwarning = _show_warning
    # Inductor's C++ build probes for CUDA and warns on CPU-only machines; that warning is noise to a user.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        cli.main(args=args, prog_name="edgekd", standalone_mode=False, obj={"argv": args})
    except EdgekdError as exc:
        click.echo(f"edgekd: error: {_rank_prefix()}{exc}", err=True)
        sys.exit(2)
    except TrainingInterrupted as exc:
        if os.environ.get("RANK", "0") != "0":
            sys.exit(128 + exc.signum)  # every rank stopped at the same step; rank 0 says where it saved
        click.echo(
            f"edgekd: stopped by {exc.signal_name}; saved step {exc.step} in {exc.checkpoint}; "
            f"resume with: {resume_command(args)}",
            err=True,
        )
        sys.exit(128 + exc.signum)
    except click.exceptions.Abort:
        click.echo(f"edgekd: aborted{_after_abort(args)}", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        # click prints usage, a hint and the error on three lines; the error alone, with where to look, is enough.
        where = f"`{exc.ctx.command_path} --help`" if exc.ctx else "`edgekd --help`"
        click.echo(f"edgekd: error: {exc.format_message()}; see {where}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:
        full = _disk_full(exc)
        if full is None:
            raise
        click.echo(f"edgekd: error: {_rank_prefix()}{full}", err=True)
        sys.exit(2)
