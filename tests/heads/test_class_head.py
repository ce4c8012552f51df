"""``ClassHead``'s rows without the whole head: block-seeded initial rows (a fresh head) and rows read from a bundle
file alone (``load_bundle(lazy_head=True)``), what a class shard of a head of millions of classes needs."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edgekd.bundle import Bundle, load_bundle, save_bundle
from edgekd.errors import CheckpointError
from edgekd.heads import create_head
from edgekd.heads.class_head import INIT_BLOCK_ROWS, initial_rows
from edgekd.heads.margin import HeadSpec
from edgekd.models import create_model

R = INIT_BLOCK_ROWS


@pytest.mark.parametrize("kind", ["arcface", "linear"])
def test_any_range_of_rows_is_the_same_rows_of_the_whole_head(kind):
    spec, C, seed = HeadSpec(kind, 64.0, 0.0), 2 * R + 37, 12345
    whole = initial_rows(spec, 3, 0, C, seed)
    # Exact: every block is drawn whole (INIT_BLOCK_ROWS rows from its own generator) and sliced, whatever the range.
    for start, stop in ((0, 1), (R - 1, R + 1), (R + 5, 2 * R + 37), (1, C), (2 * R, 2 * R + 1)):
        assert torch.equal(initial_rows(spec, 3, start, stop, seed), whole[start:stop]), (start, stop)
    assert not torch.equal(initial_rows(spec, 3, 0, C, seed + 1), whole)


def test_initial_values_follow_arcface_torch_and_nn_linear():
    """Normalized heads: N(0, 0.01) (arcface_torch's class centres); linear: U(±1/√D) (nn.Linear's default)."""
    D, C = 64, 3 * R
    normal = initial_rows(HeadSpec("cosface", 64.0, 0.4), D, 0, C, seed=1)
    # Sampling error of n = D·C = 786,432 draws: the mean's standard error is 0.01/√n = 1.1e-5 (1e-4 is 9 of them),
    # the standard deviation's relative one 1/√(2n) = 8e-4 (1 % is 12 of them; for U(−b, b) √(0.8/(4n)) = 5e-4).
    assert abs(normal.mean().item()) < 1e-4 and normal.std().item() == pytest.approx(0.01, rel=0.01)
    uniform = initial_rows(HeadSpec("linear", 1.0, 0.0), D, 0, C, seed=1)
    bound = 1 / math.sqrt(D)
    assert uniform.abs().max().item() <= bound and uniform.abs().max().item() > 0.999 * bound
    assert uniform.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)  # the std of U(−b, b)


def test_a_head_is_seeded_by_torchs_global_generator_and_meta_heads_hold_no_storage():
    torch.manual_seed(3)
    head = create_head("linear", 4, 10)
    torch.manual_seed(3)
    again = create_head("linear", 4, 10)
    torch.manual_seed(3)
    lazy = create_head("linear", 4, 10, device="meta")
    # Exact: the same seed draws the same blocks (initial_rows), and a fresh bias is zeros.
    assert torch.equal(head.weight, again.weight) and torch.equal(head.bias, torch.zeros(10))
    assert lazy.weight.is_meta and lazy.bias.is_meta and lazy.init_seed == head.init_seed
    assert torch.equal(initial_rows(lazy.spec, 4, 0, 10, lazy.init_seed), head.weight)


def _saved_bundle(tmp_path, kind: str):
    torch.manual_seed(0)
    backbone = create_model("cnn_tiny", in_chans=1, input_size=(1, 28, 28))
    head = create_head(kind, backbone.embed_dim, 9)
    head.weight.data.normal_()  # trained values: not the initialization that a fresh head would compute
    if head.bias is not None:
        head.bias.data.normal_()
    return save_bundle(tmp_path / "teacher.safetensors", Bundle(backbone, head)), head


@pytest.mark.parametrize("kind", ["cosface", "linear"])
def test_a_lazily_loaded_head_reads_any_rows_from_its_file_alone(tmp_path, kind):
    path, saved = _saved_bundle(tmp_path, kind)
    whole, lazy = load_bundle(path), load_bundle(path, lazy_head=True)
    # Exact: what is read back is what was saved (safetensors stores the bytes; no arithmetic on either side).
    assert torch.equal(whole.head.weight, saved.weight) and not whole.head.weight.is_meta
    assert lazy.head.weight.is_meta and lazy.head.source == str(path) and lazy.head.num_classes == 9
    for key, value in whole.backbone.state_dict().items():
        assert torch.equal(lazy.backbone.state_dict()[key], value), key
    weight, bias = lazy.head.rows(3, 8)
    assert torch.equal(weight, saved.weight[3:8])
    assert (bias is None) if kind != "linear" else torch.equal(bias, saved.bias[3:8])
    assert torch.equal(whole.head.rows(3, 8)[0], saved.weight[3:8])


def test_a_lazily_loaded_head_whose_tensors_do_not_fit_its_metadata_is_a_one_line_error(tmp_path):
    path, _ = _saved_bundle(tmp_path, "arcface")
    tensors = load_file(str(path))
    tensors["head.weight"] = tensors["head.weight"][:5].contiguous()
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(
        CheckpointError, match=r"teacher.safetensors: the head tensors .* do not fit the head its metadata"
    ):
        load_bundle(path, lazy_head=True)
    with pytest.raises(CheckpointError, match="the head weights do not fit"):
        load_bundle(path)


def test_a_head_saved_in_half_precision_loads_in_the_heads_float32_whole_or_lazily(tmp_path):
    """Loading converts to the parameters' dtype, as a copy into an initialized head did."""
    backbone = create_model("cnn_tiny", in_chans=1, input_size=(1, 28, 28))
    head = create_head("linear", backbone.embed_dim, 9).half()
    path = save_bundle(tmp_path / "half.safetensors", Bundle(backbone, head))
    whole, lazy = load_bundle(path), load_bundle(path, lazy_head=True)
    assert whole.head.weight.dtype == whole.head.bias.dtype == torch.float32
    # Exact: every float16 value is a float32 value, so the conversion does not round.
    assert torch.equal(whole.head.weight, head.weight.float())
    weight, bias = lazy.head.rows(2, 7)
    assert weight.dtype == bias.dtype == torch.float32 and torch.equal(weight, head.weight[2:7].float())
