"""A tiny KD distill run through the real CLI, shared by the tests that read a finished run (its report, compare).

100 impostor pairs resolve TAR@0.1 (the FAR rule needs FAR x impostors >= 5), so the run's table has a TAR column.
"""

DATA = "synthetic:identities=8,images_per_identity=4,image_size=16,pairs=200,pair_identities=20,pair_images=4"
TINY = ["--data", DATA, "--model", "r_tiny", "--batch-size", "8", "--device", "cpu", "--no-compile", "--workers", "0"]
DISTILL = ["distill", "--method", "kd", *TINY, "--steps", "2", "--teacher-model", "r_tiny", "--teacher-epochs", "1"]


def edgekd(argv: list[str]) -> int:
    """The ``edgekd`` entry point in this process; its exit code (module-scoped fixtures cannot use ``run_cli``)."""
    from edgekd.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return exc.code
    return 0
