"""``python -m edgekd.cli``: the ``edgekd`` command, as torchrun starts it on every rank (``--nproc``)."""

from edgekd.cli import main

main()
