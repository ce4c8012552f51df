"""``edgekd study``: classifier-sharing KD (TH-KD, SH-KD) against KD and KD+L2E on Fashion-MNIST, every row at one
temperature and KD weight, over paired seeds, with capacity and convergence gates and validation-only selection;
then ``REPRODUCTION.md`` and plots.

Rerunning the same command resumes: finished cells are skipped and a cell cut off mid-training continues from its
last checkpoint.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from edgekd.errors import EdgekdError
from edgekd.study import build_profile, estimate_seconds, run_study, write_report
from edgekd.study.confirmatory import build_arms
from edgekd.study.confirmatory_report import write_confirmatory_report
from edgekd.study.confirmatory_runner import arm_cells, cell_count, estimate_confirmatory_seconds, run_confirmatory
from edgekd.study.grid import ROWS, SWEPT
from edgekd.utils.out_paths import check_output_dir


@click.command("study")
@click.option(
    "--v3",
    "v3",
    is_flag=True,
    help="study v3, the pre-registered confirmatory test (docs/results/study/v3/PLAN.md): fixed hyper-parameters, "
    "fresh seeds, matched-weight KD, a Fashion-MNIST and a 1,000-identity face arm",
)
@click.option("--quick", is_flag=True, help="the short profile: 1 seed, small grids, relaxed gates (under 10 min)")
@click.option(
    "--profile", type=click.Choice(["tiny", "quick", "full", "v3", "v3-quick", "v3-tiny"]), default=None, hidden=True
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="study v3: training processes at once, one torch thread each (tiny models gain nothing from a second thread)",
)
@click.option("--out", default=None, help="study folder (default runs/study, or runs/study-quick with --quick)")
@click.option("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default: 5, or 1 with --quick)")
@click.option("--fmnist-root", default=None, help="folder of the Fashion-MNIST idx files (default: the Debian path)")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
@click.option("--plan", "plan_only", is_flag=True, help="print the cells and the time estimate; train nothing")
@click.option("--report-only", is_flag=True, help="rewrite REPRODUCTION.md and the plots from --out; train nothing")
def command(v3, quick, profile, workers, out, seeds, fmnist_root, device, threads, plan_only, report_only) -> None:
    """Run (or resume) the study and write REPRODUCTION.md with tables and plots in --out."""
    if v3 or (profile or "").startswith("v3"):
        _confirmatory(profile or ("v3-quick" if quick else "v3"), out, workers, fmnist_root, device, threads, plan_only,
                      report_only)  # fmt: skip
        return
    name = profile or ("quick" if quick else "full")
    out = check_output_dir(out or ("runs/study" if name == "full" else f"runs/study-{name}"))
    if report_only:
        if not (out / "study.json").is_file():
            raise EdgekdError(
                f"{out} holds no study (no study.json); run `edgekd study --out {shlex.quote(str(out))}` first"
            )
        click.echo(f"report: {write_report(out)}")
        return
    grid = build_profile(name, seeds=seeds, fmnist_root=fmnist_root)
    if threads is not None:
        if threads < 1:
            raise EdgekdError(f"--threads {threads} must be at least 1")
        import torch

        torch.set_num_threads(threads)
    estimate = estimate_seconds(grid)
    click.echo(
        f"study profile {name}: Fashion-MNIST, {grid.seeds} seed(s); "
        + (f"estimated {estimate / 60:.0f} min on 2 CPU cores" if estimate is not None else "no time estimate")
        + f"; folder {out}"
    )
    if plan_only:
        t, s = grid.teacher, grid.student
        click.echo(
            f"teacher {t.model} {t.model_kwargs}, {t.epochs} epochs; student {s.model} {s.model_kwargs}, "
            f"{s.epochs} epochs, at the teacher's width; {grid.train_images or 55000} training images"
        )
        sweeps = grid.sweeps
        for row in ROWS:
            param = SWEPT.get(row)
            values = ", ".join(f"{v:g}" for v in getattr(sweeps, param)) if param else ""
            note = f"seed 0 sweeps {param} over {values}; " if param else ""
            click.echo(f"  {row:<15} {note}seeds 0..{grid.seeds - 1} at the chosen values")
        return
    command_line = shlex.join(["edgekd", *sys.argv[1:]]) if Path(sys.argv[0]).name == "edgekd" else ""
    summary = run_study(
        grid,
        out,
        command=command_line or _rebuild(name, out, seeds, fmnist_root),
        device=device,
        log=click.echo,
    )
    click.echo(
        f"\n{summary['trained']} of {summary['cells']} cells trained in this run ({summary['seconds'] / 60:.1f} min); "
        f"report: {summary['report']}"
    )


def _rebuild(name: str, out: Path, seeds, fmnist_root) -> str:
    """The command line as a user would type it, for runs started in-process (tests, python -m)."""
    parts = ["edgekd", "study"]
    if name == "quick":
        parts.append("--quick")
    elif name != "full":
        parts += ["--profile", name]
    parts += ["--out", str(out)]
    if seeds is not None:
        parts += ["--seeds", str(seeds)]
    if fmnist_root is not None:
        parts += ["--fmnist-root", fmnist_root]
    return shlex.join(parts)


def _confirmatory(name, out, workers, fmnist_root, device, threads, plan_only, report_only) -> None:
    """``edgekd study --v3``: run (or resume) study v3's arms and write its REPRODUCTION.md in --out."""
    out = check_output_dir(out or f"runs/study-{name}")
    if report_only:
        if not (out / "study.json").is_file():
            raise EdgekdError(
                f"{out} holds no study (no study.json); run `edgekd study --v3 --out {shlex.quote(str(out))}` first"
            )
        click.echo(f"report: {write_confirmatory_report(out)}")
        return
    arms = build_arms(name, fmnist_root)
    estimate = estimate_confirmatory_seconds(arms, workers)
    click.echo(
        f"study {name}: {cell_count(arms)} training runs on {workers} worker(s); "
        + (f"estimated {estimate / 60:.0f} min on 2 CPU cores" if estimate is not None else "no time estimate")
        + f"; folder {out}"
    )
    if plan_only:
        for arm in arms:
            cells = ", ".join(c.row for c in arm_cells(arm, arm.seeds[0]))
            click.echo(f"  {arm.name}: teacher, then per seed {arm.seeds[0]}..{arm.seeds[-1]}: {cells}")
        return
    args = ["edgekd", "study", "--profile", name, "--out", str(out), "--workers", str(workers)]
    command_line = shlex.join(args + (["--fmnist-root", fmnist_root] if fmnist_root else []))
    summary = run_confirmatory(name, out, command_line, device, workers, threads or 1, fmnist_root)
    click.echo(f"\n{summary['cells']} cells ({summary['seconds'] / 60:.1f} min); report: {summary['report']}")
