"""``edgekd compare RUN_A RUN_B`` (issue 25): two tiny distill runs that differ in their learning rate, side by side:
the settings that differ, the final loss terms and each verification metric with its interval, of both runs and
their difference, each checked against the runs' own JSON outputs; a folder that is not a run is a one-line error."""

import json
import re

import pytest
import torch

from tests.tiny_runs import DISTILL, edgekd


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs A (lr 0.1) and B (lr 0.05) of the same tiny KD student, with the same cached teacher."""
    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEKD_CACHE_DIR", str(root / "cache"))
        for name, lr in (("a", "0.1"), ("b", "0.05")):
            torch.manual_seed(0)
            assert edgekd([*DISTILL, "--lr", lr, "--out", str(root / name)]) == 0
    return root / "a", root / "b"


def _json(path):
    return json.loads(path.read_text())


def _cells(text: str, *first: str) -> list[str]:
    """The cells of the one table row (columns apart by 2+ spaces) that starts with ``first``."""
    rows = [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]
    found = [row for row in rows if row[: len(first)] == list(first)]
    assert len(found) == 1, (first, text)
    return found[0]


def _pct_ci(value, ci) -> str:
    return f"{100 * value:.2f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def test_compare_shows_the_settings_that_differ_and_the_final_losses_of_both(runs, run_cli):
    a, b = runs
    code, out, err = run_cli(["compare", str(a), str(b)])
    assert code == 0, err
    assert _cells(out, "lr") == ["lr", "0.1", "0.05"]
    settings = _json(a / "settings.json")["settings"]
    same = sum(1 for k in settings if k not in ("lr", "out"))
    assert f"{same} other settings are the same" in out
    assert not any(line.startswith("out ") for line in out.splitlines()), "the folders always differ"

    def last(run):
        lines = (run / "student" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if '"loss"' in line][-1]

    la, lb = last(a), last(b)
    for term in ("loss", "ce", "kd"):
        assert _cells(out, "student", term) == ["student", term, f"{la[term]:.6g}", f"{lb[term]:.6g}",
                                                f"{lb[term] - la[term]:+.6g}"]  # fmt: skip


def test_compare_shows_each_verification_metric_with_intervals_and_the_difference(runs, run_cli, tmp_path):
    a, b = runs
    written = tmp_path / "a_vs_b.md"
    code, out, err = run_cli(["compare", str(a), str(b), "--out", str(written)])
    assert code == 0, err
    ra, rb = (_json(run / "results.json")["results"] for run in runs)
    for row_a, row_b in zip(ra, rb, strict=True):
        label = f"{row_a['role']} (r_tiny)"
        cells = _cells(out, "synthetic", label, "acc")
        diff = f"{100 * (row_b['acc'] - row_a['acc']):+.2f}"
        assert cells[3:] == [_pct_ci(row_a["acc"], row_a["acc_ci"]), _pct_ci(row_b["acc"], row_b["acc_ci"]), diff]
        for key, ci in row_a["tar_ci"].items():
            cells = _cells(out, "synthetic", label, key)
            assert cells[3:5] == [_pct_ci(row_a[key], ci), _pct_ci(row_b[key], row_b["tar_ci"][key])]
    auc_a, auc_b = ({m["role"]: m["auc"] for m in _json(run / "report.json")["roc"]}["student"] for run in runs)
    assert _cells(out, "synthetic", "student (r_tiny)", "auc")[3:] == [f"{auc_a:.4f}", f"{auc_b:.4f}",
                                                                      f"{auc_b - auc_a:+.4f}"]  # fmt: skip
    # The same comparison, as Markdown tables, in the file --out names.
    md = written.read_text()
    acc = _pct_ci(ra[-1]["acc"], ra[-1]["acc_ci"])
    assert f"| synthetic | student (r_tiny) | acc | {acc} |" in md and "| lr | 0.1 | 0.05 |" in md
    assert f"wrote {written}" in out


def test_a_folder_that_is_not_a_run_is_a_one_line_error(runs, run_cli, one_line, tmp_path):
    a, _ = runs
    code, _, err = run_cli(["compare", str(a), str(tmp_path)])
    one_line(code, err, str(tmp_path), "settings.json", "pass the --out folder of an `edgekd distill`")
    code, _, err = run_cli(["compare", str(tmp_path / "missing"), str(a)])
    one_line(code, err, str(tmp_path / "missing"), "is not a folder", "--out folder")
    code, _, err = run_cli(["compare", str(a), str(a), "--out", str(tmp_path / "a_vs_b.txt")])
    one_line(code, err, "a_vs_b.txt", ".md")
