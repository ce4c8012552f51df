"""A synthetic pair set that cannot be drawn (more genuine pairs than its identities hold) stops ``edgekd distill`` and
``edgekd teacher --eval-every`` before anything trains, as a broken .bin does: one line naming the counts, no run
folder, no teacher in the cache. 6 identities x 4 images hold 6 x C(4, 2) = 36 distinct genuine pairs; 200 pairs
need 100."""

import re

import pytest

TOO_MANY = "pair_identities=6,pair_images=4,pairs=200"
DATA = "synthetic:identities=8,images_per_identity=4,image_size=16"
FAST = ["--model", "r_tiny", "--batch-size", "8", "--device", "cpu", "--no-compile", "--workers", "0", "--steps", "2"]
DISTILL = ["distill", "--method", "kd", *FAST, "--teacher-model", "r_tiny", "--teacher-epochs", "1"]
WHY = ("cannot draw 100 distinct genuine pairs from 6 identities x 4 images", "36 exist", "pair_identities")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _nothing_trained(out, cache, stdout: str) -> None:
    assert not out.exists()  # no run folder, not even its settings
    assert not list(cache.rglob("*.safetensors"))  # no teacher trained for the run
    assert not re.search(r"\d+/\d+ step", stdout), stdout  # no progress line


@pytest.mark.parametrize(
    "where",
    [["--data", DATA, "--pairs", f"synthetic:{TOO_MANY},image_size=16"], ["--data", f"{DATA},{TOO_MANY}"]],
    ids=["--pairs", "--data's held-out pairs"],
)
def test_distill_checks_that_its_synthetic_pairs_can_be_drawn_before_it_trains(
    tmp_path, cache, run_cli, one_line, where
):
    out = tmp_path / "run"
    code, stdout, err = run_cli([*DISTILL, *where, "--out", str(out)])
    one_line(code, err, *WHY)
    _nothing_trained(out, cache, stdout)


def test_teacher_eval_every_checks_its_pairs_before_it_trains(tmp_path, cache, run_cli, one_line):
    out = tmp_path / "teacher"
    code, stdout, err = run_cli(
        ["teacher", *FAST, "--data", f"{DATA},{TOO_MANY}", "--eval-every", "1", "--out", str(out)]
    )
    one_line(code, err, *WHY)
    _nothing_trained(out, cache, stdout)


def test_pairs_that_fit_exactly_are_drawn(tmp_path):
    # The bound is exact: 36 genuine pairs from 6 x 4 images can be drawn (72 pairs), 37 cannot (74 pairs).
    from edgekd.data import check_pairs, create_pairs
    from edgekd.errors import DataError

    spec = "synthetic:pair_identities=6,pair_images=4,image_size=8,pairs="
    check_pairs(spec + "72")
    pairs = create_pairs(spec + "72")
    distinct = {tuple(sorted(bytes(image.numpy()) for image in pair)) for pair in pairs.images.reshape(72, 2, -1)}
    assert pairs.num_genuine == 36 and len(distinct) == 72
    with pytest.raises(DataError, match="cannot draw 37 distinct genuine pairs"):
        check_pairs(spec + "74")
