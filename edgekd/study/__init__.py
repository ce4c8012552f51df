"""The study behind ``edgekd study``: classifier-sharing KD against KD and KD+L2E at one temperature, over paired
seeds (``grid``: rows, weights and profiles as data; ``runner``: the study's order, selection and its invocations;
``cells``: one resumable training run and its evaluation (``evaluate``); ``gates``: the capacity and convergence
gates; ``stats``: paired differences and t-tests; ``report``: REPRODUCTION.md, its sections in ``report_sections``
and plots in ``report_plots``)."""

from edgekd.study.grid import PROFILES as PROFILES
from edgekd.study.grid import build_profile as build_profile
from edgekd.study.grid import estimate_seconds as estimate_seconds
from edgekd.study.report import write_report as write_report
from edgekd.study.runner import run_study as run_study
