"""The reproduction study behind ``edgekd study``: a grid of methods × datasets × seeds run through the distill
pipeline (``grid``: the profiles as data; ``runner``: resumable cells; ``report``: REPRODUCTION.md and plots)."""

from edgekd.study.grid import PROFILES as PROFILES
from edgekd.study.grid import build_profile as build_profile
from edgekd.study.grid import estimate_seconds as estimate_seconds
from edgekd.study.report import write_report as write_report
from edgekd.study.runner import run_study as run_study
