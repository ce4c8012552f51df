"""Registry-wide model tests: every name in ``list_models()`` gets shape, cfg and (if light) forward/backward checks."""

from __future__ import annotations

import json

import pytest
import torch

from edgekd.errors import EdgekdError
from edgekd.models import ModelCfg, create_model, is_model, list_models

# Too slow to run for real on a CPU test box; they get shape checks on the meta device instead.
HEAVY = {"mbf_large", "r34", "r50", "r100"}
# timm architectures small enough to train a step on in tests (no download: pretrained=False).
TIMM_LIGHT = ["timm/resnet10t", "timm/test_vit"]
# Smaller inputs keep the CPU cost down; every model must accept them.
FAST_INPUT = {"mbf": 64, "mbf_scale1": 64, "r18": 64, "timm/resnet10t": 64, "timm/test_vit": 64}

ALL = list_models()
LIGHT = [n for n in ALL if n not in HEAVY] + TIMM_LIGHT


def _build(name: str, device: str = "cpu", **kwargs) -> torch.nn.Module:
    with torch.device(device):
        return create_model(name, **kwargs)


def test_registry_lists_the_contract_names():
    expected = {"mbf", "mbf_large", "mbf_scale1", "mbf_tiny", "r18", "r34", "r50", "r100", "r_tiny"}
    assert expected | {"cnn_small", "cnn_tiny"} <= set(ALL)
    assert ALL == sorted(ALL)
    assert list_models("mbf*") == ["mbf", "mbf_large", "mbf_scale1", "mbf_tiny"]
    assert set(list_models("*_tiny")) == {"mbf_tiny", "r_tiny", "cnn_tiny"}
    assert "timm/resnet10t" in list_models("timm/resnet1*")
    assert is_model("mbf") and is_model("timm/resnet10t")
    assert not is_model("nope") and not is_model("timm/nope") and not is_model("timm/")


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_cfg_on_meta(name):
    model = _build(name, "meta")
    cfg = model.cfg
    assert isinstance(cfg, ModelCfg) and cfg.name == name
    assert cfg.embed_dim == model.embed_dim
    assert len(cfg.input_size) == 3 and len(cfg.mean) == len(cfg.std) == cfg.input_size[0]
    out = model.eval()(torch.empty(2, *cfg.input_size, device="meta"))
    assert out.shape == (2, model.embed_dim)
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features > model.embed_dim for m in model.modules()), (
        "no classifier inside models"
    )


@pytest.mark.parametrize("name", ALL + TIMM_LIGHT)
def test_cfg_round_trip(name):
    model = _build(name, "meta", **({"input_size": FAST_INPUT[name]} if name in FAST_INPUT else {}))
    saved = json.loads(json.dumps(model.cfg.to_dict()))  # what a checkpoint stores
    cfg = ModelCfg.from_dict(saved)
    assert cfg == model.cfg
    rebuilt = _build(cfg.name, "meta", **cfg.kwargs)
    assert rebuilt.cfg == model.cfg
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", LIGHT)
def test_forward_backward(name):
    torch.manual_seed(0)
    model = _build(name, **({"input_size": FAST_INPUT[name]} if name in FAST_INPUT else {})).train()
    x = torch.randn(2, *model.cfg.input_size)
    out = model(x)
    assert out.shape == (2, model.embed_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            # timm zero-initializes the last BN of each residual block, which blocks some gradients at step 0.
            assert name.startswith("timm/") or p.grad.abs().sum() > 0, f"{pname} gets no gradient"


def test_none_kwargs_are_dropped():
    model = _build("mbf_tiny", "meta", embed_dim=None, input_size=None)
    assert model.embed_dim == 128 and model.cfg.input_size == (3, 112, 112)


def test_overrides_reach_the_model():
    model = _build("mbf_tiny", "meta", embed_dim=32, input_size=48, in_chans=1)
    assert model.embed_dim == 32 and model.cfg.input_size == (1, 48, 48)
    assert model.cfg.mean == (0.5,) and model.cfg.channel_order == "L"
    assert model.cfg.kwargs["input_size"] == [1, 48, 48] and "in_chans" not in model.cfg.kwargs
    cnn = _build("cnn_small", "meta", in_chans=3, input_size=32)
    assert cnn.cfg.input_size == (3, 32, 32) and len(cnn.cfg.mean) == 3 and cnn.cfg.channel_order == "RGB"


def test_unknown_name_is_a_one_line_user_error():
    with pytest.raises(EdgekdError) as e:
        create_model("nope")
    assert "\n" not in str(e.value) and "'nope'" in str(e.value) and "mbf" in str(e.value)
    with pytest.raises(EdgekdError, match="did you mean.*mbf_tiny"):
        create_model("mbf_tinyy")
    with pytest.raises(EdgekdError, match="unknown timm architecture") as e:
        create_model("timm/resnet10tt")
    assert "\n" not in str(e.value)


def test_unknown_option_and_bad_sizes_are_user_errors():
    with pytest.raises(EdgekdError, match="does not take option.*scale"):
        create_model("r_tiny", scale=2)
    with pytest.raises(EdgekdError, match="multiples of 16"):
        create_model("mbf_tiny", input_size=100)
    with pytest.raises(EdgekdError, match="channels"):
        create_model("mbf_tiny", input_size=(3, 64, 64), in_chans=1)


@pytest.mark.parametrize("side,kernel", [(64, 4), (112, 7)])
def test_mbf_gdc_kernel_follows_input_size(side, kernel):
    model = _build("mbf", input_size=side).eval()
    assert model.features.layers[0].layers[0].weight.shape == (512, 1, kernel, kernel)
    with torch.no_grad():
        assert model(torch.randn(1, 3, side, side)).shape == (1, 512)


@pytest.mark.parametrize("name", ["mbf", "r_tiny"])
def test_eval_embeddings_do_not_depend_on_batch(name, network_atol):
    torch.manual_seed(0)
    model = _build(name, input_size=64).eval()
    x = torch.randn(4, *model.cfg.input_size)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(4)])
    # Equal up to float32 rounding: batch 1 and batch 4 may take other kernels, which sum in other orders. The bound
    # is network_atol (tests/conftest.py): 8 ulps per Conv/Linear layer of the largest embedding entry (r_tiny
    # differs by 14 ulps of it on an AMD EPYC).
    torch.testing.assert_close(single, batched, rtol=0, atol=network_atol(model, batched))


def test_timm_head_hidden_size_and_fixed_input_size():
    # MobileNetV3 returns its pre-logits conv width (1024), not num_features (288): the neck must take 1024.
    mnv3 = _build("timm/mobilenetv3_small_050", input_size=64).eval()
    assert mnv3.neck.fc.in_features == 1024
    # A ViT is built for the requested size (timm's img_size) instead of failing on a 64×64 input.
    vit = _build("timm/test_vit", input_size=64, embed_dim=16).eval()
    with torch.no_grad():
        assert mnv3(torch.randn(1, 3, 64, 64)).shape == (1, 512)
        assert vit(torch.randn(1, 3, 64, 64)).shape == (1, 16)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mbf_exports_to_onnx_with_dynamic_batch(tmp_path, network_atol):
    # The TorchScript exporter traces shapes: arcface_torch's x.view(x.size(0), -1) would freeze batch 1 here
    # (face.md §0.3), so it is the stricter check that the flatten keeps the batch dynamic.
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _build("mbf_tiny", input_size=32).eval()
    path = tmp_path / "mbf_tiny.onnx"
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 32, 32),),
        str(path),
        input_names=["input"],
        output_names=["embedding"],
        dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
        dynamo=False,
    )
    onnx.checker.check_model(str(path))
    x = torch.randn(3, 3, 32, 32)
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = model(x)
    # ONNX Runtime's float32 kernels against PyTorch's: other sum orders (network_atol, tests/conftest.py; measured
    # 13 ulps of the largest entry). A fresh mbf_tiny's embeddings are ~4e-4, so a fixed 1e-5 would say nothing.
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=network_atol(model, want))
