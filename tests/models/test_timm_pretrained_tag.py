"""A timm pretrained tag cannot be honoured offline: the user is told, and the model is the plain architecture."""

import pytest

from edgekd.errors import EdgekdWarning
from edgekd.models import create_model


def test_pretrained_tag_warns_and_builds_the_untagged_architecture():
    with pytest.warns(EdgekdWarning, match="pretrained tag is ignored"):
        model = create_model("timm/resnet10t.c3_in1k", input_size=32, embed_dim=8)
    assert model.cfg.name == "timm/resnet10t"


def test_cli_prints_the_warning_as_one_line(tmp_path, run_cli):
    data = "synthetic:identities=4,images_per_identity=4,image_size=32"
    argv = ["teacher", "--data", data, "--model", "timm/resnet10t.c3_in1k", "--batch-size", "8", "--steps", "1"]
    code, _, err = run_cli([*argv, "--device", "cpu", "--no-compile", "--out", str(tmp_path / "t")])
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("edgekd: warning: timm/resnet10t.c3_in1k")]
