"""The ``edgekd`` command line: a click group whose subcommands live one per module in this package.

User errors (``EdgekdError``) are printed as one line and exit with status 2; no traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from edgekd.errors import EdgekdError
from edgekd.version import __version__

# Subcommand name -> module defining ``command``; imported only when that subcommand runs, so
# `edgekd --help` stays fast and optional dependencies load late.
SUBCOMMANDS = {
    "teacher": "edgekd.cli.teacher",
    "distill": "edgekd.cli.distill",
    "eval": "edgekd.cli.eval",
    "export": "edgekd.cli.export",
    "benchmark-latency": "edgekd.cli.benchmark_latency",
    "data": "edgekd.cli.data",
    "study": "edgekd.cli.study",
}

SUMMARIES = {
    "teacher": "Train or fine-tune a teacher (--student-head for an SH-KD student-aware teacher).",
    "distill": "Train a student: vanilla, kd, l2e, th-kd or sh-kd (default: built-in identities, TH-KD).",
    "eval": "Verification / classification accuracy of a checkpoint, ONNX file or engine.",
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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the group and turns ``EdgekdError`` into one line on stderr, exit 2."""
    # Inductor's C++ build probes for CUDA and warns on CPU-only machines; that warning is noise to a user.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        cli.main(args=argv, prog_name="edgekd", standalone_mode=False)
    except EdgekdError as exc:
        click.echo(f"edgekd: error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("edgekd: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
