"""Benchmark scripts whose output BENCHMARKS.md records, run as `python -m bench.NAME` from the repository root."""
