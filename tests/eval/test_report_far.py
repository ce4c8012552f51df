"""Issue 25 item 4 in the reports: eval.json, the printed lines and the distill table show TAR only at FARs the
impostor count resolves, and every accuracy and TAR with its 95 % interval."""

import numpy as np
import torch
from torch import nn

from edgekd.cli.eval import _pairs_report
from edgekd.data.pairs import PairSet
from edgekd.distill.run import results_table
from edgekd.eval.embed import evaluate_pairs
from edgekd.eval.report import format_verification


def _pairs(n_pairs, seed=0):
    """Noisy pairs: genuine = an image and a perturbed copy, impostor = two unrelated images."""
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (2 * n_pairs, 3, 4, 4), dtype=torch.uint8, generator=gen)
    issame = np.arange(n_pairs) % 2 == 0
    noise = torch.randint(-90, 90, (n_pairs, 3, 4, 4), generator=gen)
    images = []
    for i, s in enumerate(issame):
        a = imgs[2 * i]
        b = (a.int() + noise[i]).clamp(0, 255).to(torch.uint8) if s else imgs[2 * i + 1]
        images += [a, b]
    return PairSet(torch.stack(images), issame, name="toy")


def test_evaluate_pairs_reports_resolvable_fars_and_intervals():
    res = evaluate_pairs(nn.Flatten(), _pairs(300), mean=0.5, std=0.5, batch_size=64)  # 150 impostors
    assert res["impostors"] == 150
    assert list(res["tar_ci"]) == [1e-1]
    assert res["fars_left_out"] == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]
    lo, hi = res["tar_ci"][1e-1]
    assert lo <= res["tar_at_far"][1e-1] <= hi
    lo, hi = res["accuracy_ci"]
    assert lo <= res["accuracy"] <= hi <= 1.0 and lo < hi


def test_eval_json_leaves_out_unresolvable_fars_and_says_why():
    res = evaluate_pairs(nn.Flatten(), _pairs(300), mean=0.5, std=0.5, batch_size=64)
    report = _pairs_report(res)
    assert list(report["tar_at_far"]) == ["0.1"] and list(report["tar_ci"]) == ["0.1"]
    assert len(report["acc_ci"]) == 2 and len(report["tar_ci"]["0.1"]) == 2
    left = report["fars_left_out"]
    assert left["fars"] == ["1e-06", "1e-05", "0.0001", "0.001", "0.01"]
    assert "150 impostor pairs" in left["reason"] and "5" in left["reason"]


def test_printed_line_shows_intervals_and_no_unresolvable_far():
    line = format_verification("lfw", 0.888, (0.871, 0.902), {1e-1: 0.5}, {1e-1: (0.442, 0.558)})
    assert line == "lfw: accuracy (%) 88.80 [87.1, 90.2]  |  TAR@FAR (%) 1e-01: 50.00 [44.2, 55.8]"
    line = format_verification("toy", 0.9, (0.85, 0.95), {}, {}, impostors=20)
    assert line.startswith("toy: accuracy (%) 90.00 [85.0, 95.0]  |  TAR@FAR (%) none resolvable")
    assert "20 impostor pairs" in line


def test_results_table_shows_intervals_and_only_resolved_columns():
    rows = [
        {"pairs": "toy", "role": "teacher", "model": "r", "params": 2e6, "acc": 0.888, "acc_ci": [0.871, 0.902],
         "tar@0.1": 0.5, "tar_ci": {"tar@0.1": [0.442, 0.558]}},
        {"pairs": "toy", "role": "student", "model": "m", "params": 1e6, "acc": 0.8, "acc_ci": [0.78, 0.82],
         "tar@0.1": 0.4, "tar_ci": {"tar@0.1": [0.35, 0.45]}},
    ]  # fmt: skip
    table = results_table({"method": "th-kd", "results": rows})
    header = table.splitlines()[1]
    assert "tar@0.1 %" in header and "tar@0.001" not in table and "_ci" not in table
    assert "88.80 [87.1, 90.2]" in table and "50.00 [44.2, 55.8]" in table
    noted = results_table({"method": "th-kd", "results": [{**r, "impostor_pairs": 150} for r in rows]})
    assert "150 impostor pairs" in noted and "95 % intervals" in noted
    old = [{k: v for k, v in row.items() if not k.endswith("_ci")} for row in rows]  # a results.json from before
    assert "88.80" in results_table({"method": "th-kd", "results": old})
