"""arcface_torch compatibility: parameter counts, state-dict key names, and loading foreign checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from edgekd.errors import CheckpointError
from edgekd.models import create_model
from edgekd.models.convert import convert_treb1en_mbf, is_treb1en_mbf, load_arcface_torch_state_dict

KEY_FILE = Path(__file__).parents[1] / "data_files" / "mbf_state_dict_keys.txt"


def _meta(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _reference_keys() -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in KEY_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split(" ", 1)
            keys[name] = tuple(int(d) for d in re.findall(r"\d+", shape))
    return keys


def _randomized(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with every float tensor replaced by random values (running_var kept positive)."""
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            v = (
                torch.rand(v.shape, generator=gen) + 0.5
                if k.endswith("running_var")
                else torch.randn(v.shape, generator=gen) * 0.1
            )
        sd[k] = v.clone()
    return sd


@pytest.mark.parametrize(
    "name,count",
    [("mbf", 2_059_520), ("mbf_large", 6_314_880)],
)
def test_mbf_param_counts_exact(name, count):
    model = _meta(name)
    assert _n_params(model) == count
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "name,millions,entries",
    [("mbf_scale1", 1.20, 333), ("r18", 24.03, 187), ("r34", 34.14, 331), ("r50", 43.59, 475), ("r100", 65.16, 925)],
)
def test_param_counts_to_stated_digits(name, millions, entries):
    model = _meta(name)
    assert round(_n_params(model) / 1e6, 2) == millions
    assert len(model.state_dict()) == entries


def test_mbf_scale1_128d_matches_the_paper_size():
    assert round(_n_params(_meta("mbf_scale1", embed_dim=128)) / 1e6, 3) == 1.003


def test_mbf_state_dict_equals_the_reference_key_list():
    reference = _reference_keys()
    assert len(reference) == 333
    ours = {k: tuple(v.shape) for k, v in _meta("mbf").state_dict().items()}
    assert list(ours) == list(reference)
    assert ours == reference


def test_reference_key_list_loads_strict():
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in _reference_keys().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=gen) + 0.5
        else:
            sd[k] = torch.randn(shape, generator=gen) * 0.1
    model = create_model("mbf").eval()
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.features.layers[2].weight, sd["features.layers.2.weight"])  # a copy: exact
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 112, 112))).all()


def test_mbf_large_nests_layer1_as_residual():
    keys = _meta("mbf_large").state_dict()
    assert "layers.1.layers.1.layers.0.layers.0.weight" in keys and "layers.1.layers.0.weight" not in keys


def test_iresnet_key_names_and_frozen_features():
    sd = _meta("r50").state_dict()
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    assert sd["prelu.weight"].shape == (64,)
    assert sd["layer1.0.downsample.0.weight"].shape == (64, 64, 1, 1)
    assert "layer1.0.downsample.1.running_var" in sd and "layer1.1.downsample.0.weight" not in sd
    assert sd["layer3.13.bn3.weight"].shape == (256,) and "layer3.14.bn3.weight" not in sd
    assert sd["layer4.2.conv2.weight"].shape == (512, 512, 3, 3)
    assert sd["bn2.weight"].shape == (512,)
    assert sd["fc.weight"].shape == (512, 25088) and sd["fc.bias"].shape == (512,)
    assert {f"features.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")} <= set(
        sd
    )
    r18 = create_model("r18")
    assert not r18.features.weight.requires_grad and r18.features.bias.requires_grad
    assert torch.equal(r18.features.weight, torch.ones(512))
    assert r18.dropout.p == 0.0


def test_init_follows_arcface_torch():
    mbf = create_model("mbf_tiny")
    bns = [m for m in mbf.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in bns)
    conv = mbf.conv_sep.layers[0].weight  # kaiming normal, fan_out: std = sqrt(2 / (C_out * k * k))
    assert abs(conv.std().item() - (2 / conv.shape[0]) ** 0.5) < 0.2 * (2 / conv.shape[0]) ** 0.5


def _to_treb1en(key: str) -> str:
    """arcface_torch mbf key -> TreB1eN / face.evoLVe key, written per block type (independent of the converter)."""
    conv_block = {"0": "conv", "1": "bn", "2": "prelu"}
    depthwise = {"0": "conv", "1": "conv_dw", "2": "project"}
    single = {"layers.0": "conv1", "layers.1": "conv2_dw", "conv_sep": "conv_6_sep", "features.layers.0": "conv_6_dw"}
    dws = {"layers.2": "conv_23", "layers.4": "conv_34", "layers.6": "conv_45"}
    residuals = {"layers.3": "conv_3", "layers.5": "conv_4", "layers.7": "conv_5"}
    if m := re.fullmatch(r"features\.layers\.2\.(\w+)", key):
        return f"linear.{m[1]}"
    if m := re.fullmatch(r"features\.layers\.3\.(\w+)", key):
        return f"bn.{m[1]}"
    if m := re.fullmatch(r"(features\.layers\.0|layers\.[01]|conv_sep)\.layers\.(\d)\.(\w+)", key):
        return f"{single[m[1]]}.{conv_block[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"(layers\.[246])\.layers\.(\d)\.layers\.(\d)\.(\w+)", key):
        return f"{dws[m[1]]}.{depthwise[m[2]]}.{conv_block[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"(layers\.[357])\.layers\.(\d+)\.layers\.(\d)\.layers\.(\d)\.(\w+)", key):
        return f"{residuals[m[1]]}.model.{m[2]}.{depthwise[m[3]]}.{conv_block[m[4]]}.{m[5]}"
    raise AssertionError(f"unmapped key {key}")


def test_treb1en_conversion_round_trip():
    torch.manual_seed(0)
    source = create_model("mbf_scale1", input_size=64).eval()  # 64² keeps it fast; only the GDC kernel differs
    sd = _randomized(source)
    source.load_state_dict(sd)
    treb1en = {_to_treb1en(k): v for k, v in sd.items()}
    assert "conv_3.model.0.conv_dw.bn.running_var" in treb1en and is_treb1en_mbf(treb1en)
    converted = convert_treb1en_mbf(treb1en)
    assert list(converted) == list(sd) and all(converted[k] is v for k, v in sd.items())
    target = load_arcface_torch_state_dict(create_model("mbf_scale1", input_size=64).eval(), treb1en)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # exact: the same architecture with the same weights on the same input, in one process
        assert torch.equal(target(x), source(x))


def test_adadistill_prefix_and_affine_free_bn_convert():
    source = create_model("mbf_scale1", input_size=64).eval()
    sd = _randomized(source)
    sd["features.layers.3.weight"] = torch.ones(512)  # what an affine-free BatchNorm1d computes
    sd["features.layers.3.bias"] = torch.zeros(512)
    source.load_state_dict(sd)
    tail = ("conv_6_dw.", "linear.", "bn.")
    treb1en = {}
    for k, v in sd.items():
        new = _to_treb1en(k)
        if new in ("bn.weight", "bn.bias"):
            continue
        treb1en["output_layer." + new if new.startswith(tail) else new] = v
    target = load_arcface_torch_state_dict(create_model("mbf_scale1", input_size=64).eval(), treb1en)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # exact: the same architecture with the same weights (the BatchNorm's 1s and 0s included)
        assert torch.equal(target(x), source(x))


def test_iresnet_is_not_mistaken_for_treb1en():
    assert not is_treb1en_mbf(_meta("r_tiny").state_dict())


def test_loader_accepts_wrapped_prefixed_files(tmp_path):
    source = create_model("mbf_tiny").eval()
    sd = _randomized(source)
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    target = load_arcface_torch_state_dict(create_model("mbf_tiny"), path)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in sd.items())  # copies: exact
    plain = tmp_path / "model.pt"
    torch.save(sd, plain)
    load_arcface_torch_state_dict(create_model("mbf_tiny"), str(plain))


def test_loader_mismatch_is_a_one_line_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_arcface_torch_state_dict(create_model("mbf_tiny"), _meta("r_tiny").state_dict())
    msg = str(e.value)
    assert "\n" not in msg and "missing keys" in msg and "unexpected keys" in msg and "--model" in msg
    with pytest.raises(CheckpointError, match=r"'mbf_tiny'.*keys with other shapes"):
        load_arcface_torch_state_dict(create_model("mbf_tiny"), create_model("mbf_tiny", embed_dim=64).state_dict())
    with pytest.raises(CheckpointError, match="not found"):
        load_arcface_torch_state_dict(create_model("mbf_tiny"), tmp_path / "absent.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_arcface_torch_state_dict(create_model("mbf_tiny"), bad)
    torch.save({"epoch": 3}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="not a state_dict"):
        load_arcface_torch_state_dict(create_model("mbf_tiny"), tmp_path / "meta.pth")
