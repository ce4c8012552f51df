"""The gated-write job every export route shares: the file is written under a temporary name, the gates run on what
was written, and only a pass puts the artifact and its sidecar JSON in place."""

from __future__ import annotations

import json

import pytest
import torch

from edgekd.errors import GateFailed
from edgekd.export.artifact import Gates, write_gated


def _gates(log: list[str]) -> Gates:
    inputs = {"synthetic": torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))}
    return Gates(
        reference=lambda x: x.flatten(1),
        inputs=inputs,
        pairs=None,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        batches=(1, 4),
        min_cosine=None,
        max_drop=0.5,
        log=log.append,
    )


def _write(scale: str):
    """An artifact that is a scale factor; the candidate that reads it multiplies the reference by it."""

    def write(tmp):
        tmp.write_text(scale)

    def candidate(tmp):
        assert tmp.is_file() and tmp.name.endswith(".tmp"), "gated under its temporary name"
        factor = float(tmp.read_text())
        return lambda x: factor * x.flatten(1)

    return write, candidate


def test_a_passing_artifact_is_renamed_into_place_with_its_sidecar(tmp_path):
    log: list[str] = []
    path = tmp_path / "out" / "m.bin"
    write, candidate = _write("2.0")  # a scaled embedding has cosine 1 to the reference
    written = write_gated(path, write, candidate, _gates(log), kind="toy", precision="fp32", sidecar={"extra": 1})

    assert written.path == path and path.read_text() == "2.0" and written.gate.passed
    assert {row.batch for row in written.gate.rows} == {1, 4}
    meta = json.loads(written.sidecar.read_text())
    assert written.sidecar == path.with_name("m.bin.json")
    assert meta["artifact"] == "m.bin" and meta["kind"] == "toy" and meta["precision"] == "fp32" and meta["extra"] == 1
    assert meta["gate"]["passed"] and meta["environment"]["versions"]["torch"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.bin", "m.bin.json"]
    assert "-> PASS" in log[0] and log[-1] == f"wrote {path} and m.bin.json"


def test_a_failing_artifact_leaves_nothing_and_logs_its_report(tmp_path):
    log: list[str] = []
    write, candidate = _write("-1.0")  # cosine -1 to the reference
    with pytest.raises(GateFailed, match="m.bin failed its fp16 gate"):
        write_gated(tmp_path / "m.bin", write, candidate, _gates(log), kind="toy", precision="fp16", sidecar={})
    assert list(tmp_path.iterdir()) == []
    assert len(log) == 1 and "-> FAIL" in log[0]


def test_gate_as_and_gate_batches_override_the_defaults(tmp_path):
    write, candidate = _write("1.0")
    written = write_gated(
        tmp_path / "m.plan",
        write,
        candidate,
        _gates([]),
        kind="tensorrt-plan",
        precision="fp32",
        sidecar={},
        gate_as="trt-fp32",
        gate_batches=(2,),
    )
    assert written.gate.precision == "trt-fp32" and written.gate.threshold == 0.9999
    assert {row.batch for row in written.gate.rows} == {1, 2}  # batch 1 always runs: drift is measured against it
    assert json.loads(written.sidecar.read_text())["precision"] == "fp32"


def test_generated_gate_images_are_held_out_identities_of_the_given_synthetic_spec():
    from edgekd.data import create_dataset
    from edgekd.data.transforms import normalize
    from edgekd.export.artifact import gate_inputs
    from edgekd.models import create_model

    cfg = create_model("mbf_tiny", input_size=32).cfg
    spec = "synthetic:difficulty=0.9"
    got = gate_inputs(cfg, 4, seed=3, real=None, with_noise=False, generated=spec)["synthetic"]
    faces = create_dataset(spec, split="heldout", identities=4, images_per_identity=1, image_size=32, seed=3)
    want = normalize(torch.stack([faces[i][0] for i in range(4)]), cfg.mean, cfg.std)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # exact: the same call renders the same uint8 faces
    default = gate_inputs(cfg, 4, seed=3, real=None, with_noise=False)["synthetic"]
    assert not torch.equal(got, default)  # the spec's difficulty reaches the images
