"""torchrun's variables set wrong (by hand, or left over from another job): one line before anything is written.

Each case once ended in a traceback (a rank variable alone made the error printer itself raise; MASTER_ADDR unset
failed inside init_process_group) or hung (a RANK outside WORLD_SIZE waited for partners that never come). Now every
command that trains checks them first (``edgekd.distributed.launch.check_torchrun_env``) and leaves --out as it was.
"""

from __future__ import annotations

import pytest

TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MEET = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
TWO = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", **MEET}
CASES = [
    ({"WORLD_SIZE": "2"}, "incomplete: WORLD_SIZE=2 but no RANK or LOCAL_RANK"),
    ({"RANK": "0"}, "incomplete: RANK=0 but no WORLD_SIZE or LOCAL_RANK"),
    ({"LOCAL_RANK": "0"}, "incomplete: LOCAL_RANK=0 but no RANK or WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "no LOCAL_RANK"),
    ({"RANK": "1", "LOCAL_RANK": "1", **MEET}, "no WORLD_SIZE"),
    ({**TWO, "RANK": "x"}, "RANK='x' is not a whole number"),
    ({**TWO, "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
    ({**TWO, "LOCAL_RANK": "-"}, "LOCAL_RANK='-' is not a whole number"),
    ({**TWO, "LOCAL_WORLD_SIZE": "1.5"}, "LOCAL_WORLD_SIZE='1.5' is not a whole number"),
    ({**TWO, "MASTER_PORT": "abc"}, "MASTER_PORT='abc' is not a whole number"),
    ({**TWO, "RANK": "2"}, "RANK=2 is not a rank of WORLD_SIZE=2 (ranks 0..1)"),
    ({**TWO, "RANK": "-1"}, "RANK=-1 is not a rank of WORLD_SIZE=2"),
    ({**TWO, "WORLD_SIZE": "0"}, "RANK=0 is not a rank of WORLD_SIZE=0"),
    ({**TWO, "LOCAL_RANK": "3"}, "LOCAL_RANK=3 of LOCAL_WORLD_SIZE=2 does not fit a world of 2"),
    ({**TWO, "LOCAL_WORLD_SIZE": "4"}, "LOCAL_RANK=0 of LOCAL_WORLD_SIZE=4 does not fit a world of 2"),
    ({k: v for k, v in TWO.items() if k not in MEET}, "MASTER_ADDR and MASTER_PORT not set: the ranks cannot meet"),
    ({k: v for k, v in TWO.items() if k != "MASTER_PORT"}, "WORLD_SIZE=2 but MASTER_PORT not set"),
]
TINY = ["--model", "r_tiny", "--batch-size", "8", "--device", "cpu", "--no-compile", "--workers", "0", "--steps", "1"]


def _environ(monkeypatch, env: dict) -> None:
    for name in TORCHRUN:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("command", ["teacher", "distill"])
@pytest.mark.parametrize(("env", "said"), CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_torchrun_variables_are_one_line_before_anything_is_written(env, said, command, run_cli, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    _environ(monkeypatch, env)
    out = tmp_path / "run"
    code, _, err = run_cli([command, *TINY, "--out", str(out)])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("edgekd: error: "), err
    assert said in lines[0] and "torchrun or --nproc" in lines[0], lines[0]
    assert not out.exists()


def test_a_world_of_one_from_torchrun_variables_trains(run_cli, tmp_path, monkeypatch):
    """WORLD_SIZE=1 with its rank set (torchrun --nproc-per-node 1) is a plain one-process run."""
    _environ(monkeypatch, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    code, _, err = run_cli(["teacher", *TINY, "--out", str(tmp_path / "run")])
    assert code == 0, err
