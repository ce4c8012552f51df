"""``SyncBatchNorm`` layer by layer, in a gloo world of one (the 2-rank runs are in test_sharded_training.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from timm.layers import BatchNormAct2d
from torch import nn

from edgekd.distributed.sync_bn import SyncBatchNorm, convert_sync_batchnorm, restore
from edgekd.errors import EdgekdError


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


class _OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def _bn_act() -> BatchNormAct2d:
    return BatchNormAct2d(4, act_layer=nn.PReLU).double()  # an activation with a parameter: its key must survive


def test_batchnorm_act_keeps_its_activation_and_keys(group):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3).double(), _bn_act())
    alone, keys = copy.deepcopy(model), list(model.state_dict())
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    swapped = convert_sync_batchnorm(model, group)
    assert isinstance(model[1], SyncBatchNorm) and list(model.state_dict()) == keys
    want = alone(x)
    # float64 (u = 1.1e-16): synchronized statistics are sums all-reduced (in a world of one) instead of torch's own
    # mean and variance: other orders over 6·6·6 values of size ~1, ≲ 1e-14 after normalizing; 1e-12 both ways.
    torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, alone[1].running_var, rtol=1e-12, atol=1e-12)
    restore(swapped)
    assert isinstance(model[1], BatchNormAct2d)


def test_a_batchnorm_with_a_forward_of_its_own_is_refused(group):
    with pytest.raises(EdgekdError, match="_OwnForward is a BatchNorm layer with a forward of its own"):
        convert_sync_batchnorm(nn.Sequential(_OwnForward(4)), group)


def test_eval_without_running_statistics_normalizes_with_the_batch(group):
    bn = nn.BatchNorm2d(4, track_running_stats=False).double().eval()
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    sync = SyncBatchNorm(bn, group.group_name).eval()
    torch.testing.assert_close(sync(x), bn(x), rtol=1e-12, atol=1e-12)  # float64, other sum orders: as above
