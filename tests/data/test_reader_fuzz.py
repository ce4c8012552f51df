"""Mutated ``.rec`` / ``.idx`` / ``.bin`` files either read or raise DataError, never another exception.

Runs bench/fuzz_readers.py's fuzzer (the same fixtures, mutations and reads) on a small seeded budget, so the suite
and the long benchmark run never drift apart; a failure prints each case with the command that replays it.
"""

import pytest

from bench import fuzz_readers

MUTATIONS, SEED = 500, 0


@pytest.fixture(scope="module")
def fuzzer():
    return fuzz_readers


def test_mutated_files_read_or_raise_data_error(fuzzer, tmp_path):
    results = fuzzer.fuzz(MUTATIONS, SEED, tmp_path)
    failures = [case for case in results if case.outcome == "other"]
    assert not failures, "\n".join(fuzzer.describe_failure(case, SEED, MUTATIONS) for case in failures[:5])
    counts = fuzzer.summarize(results)
    # The budget reaches every file, and with both outcomes: a fuzzer whose every case dies at the first check
    # (or whose mutations all miss) would pass while testing little.
    for name in ("insightface.rec", "insightface.idx", "plain.rec", "plain.idx", "protocol4.bin", "protocol2.bin"):
        assert counts[(name, "ok")] > 0 and counts[(name, "data_error")] > 20, (name, counts)


def test_a_case_replays_alone(fuzzer, tmp_path):
    whole = fuzzer.fuzz(40, SEED, tmp_path / "a")
    again = fuzzer.fuzz(40, SEED, tmp_path / "b", cases=[37])
    assert [(c.target, c.mutation, c.outcome) for c in again] == [(whole[37].target, whole[37].mutation,
                                                                  whole[37].outcome)]  # fmt: skip
