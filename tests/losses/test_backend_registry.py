"""The loss-backend registry: every backend loads by name, and a missing or broken one is an error that names it.

``auto`` picks only a backend that loads: on CUDA it warns and uses chunked when triton cannot load; it never falls
back to ``reference``, which holds B×C logits and runs out of memory at C = 2M.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from edgekd.distributed.sharded_loss import check_sharded_backend
from edgekd.errors import EdgekdError, EdgekdWarning, MissingDependency
from edgekd.heads import HeadSpec
from edgekd.kernels.sweeps import SWEEPS
from edgekd.losses import LossWeights, list_loss_backends, resolve_backend, shared_head_loss
from edgekd.losses import shared_head as registry

SPEC_BACKENDS = {"auto", "reference", "chunked", "triton"}  # SPEC §4

_LOAD_SCRIPT = r"""
import json, sys, torch
from edgekd.errors import MissingDependency
from edgekd.heads import HeadSpec
from edgekd.losses import LossWeights, list_loss_backends, shared_head_loss

device = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)
z_s, z_t, W = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(20, 8, generator=g) * 0.1
labels = torch.randint(0, 20, (6,), generator=g)
weights = LossWeights(ce=1.0, kd=0.5, th_ce=0.3, th_kd=0.2, T=2.0)
totals = {}
for name in list_loss_backends():
    try:
        total, _ = shared_head_loss(z_s.to(device), labels.to(device), W_s=W.to(device), W_t=0.5 * W.to(device),
                                    z_t=z_t.to(device), head=HeadSpec("arcface", 16.0, 0.5), weights=weights,
                                    backend=name)
        totals[name] = total.item()
    except MissingDependency as exc:
        totals[name] = str(exc)
print(json.dumps({"names": list_loss_backends(), "totals": totals}))
"""


def test_every_backend_loads_by_name_in_a_fresh_process():
    """A process that imports only edgekd.losses asks for each listed backend by name: each loads and agrees with
    the reference, so a backend that is listed but not wired in (or not listed) fails here."""
    out = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["names"]) >= SPEC_BACKENDS and result["names"][0] == "auto"
    totals = result["totals"]
    if importlib.util.find_spec("triton") is None:
        assert "not installed" in totals.pop("triton")
    # float32 (u = 2⁻²⁴), D = 8, s = 16: a logit s·cos is rounded by ≲ s·D·u ≈ 8e-6 and the total (a few terms of
    # size ~1-10) by about as much; 1e-4 relative leaves a margin and still catches a backend computing another loss.
    for name, total in totals.items():
        assert total == pytest.approx(totals["reference"], rel=1e-4), name


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry as a fresh process has it: no optional backend loaded, no load failure remembered."""
    for name, sweep in SWEEPS.items():
        if sweep.requires:
            monkeypatch.delitem(registry.LOSS_BACKENDS, name, raising=False)
    monkeypatch.setattr(registry, "_LOAD_ERRORS", {})


def test_missing_triton_is_a_one_line_error_naming_it(monkeypatch, fresh_registry):
    monkeypatch.setitem(sys.modules, "triton", None)  # what an environment without Triton looks like to imports
    with pytest.raises(MissingDependency, match="loss backend 'triton' needs the triton package") as exc:
        resolve_backend("triton", torch.device("cuda"))
    assert "\n" not in str(exc.value)
    with pytest.warns(EdgekdWarning, match="using chunked, not triton: .*not installed"):
        assert resolve_backend("auto", torch.device("cuda")) == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on the CPU chunked is the choice, not a fallback: no warning
        assert resolve_backend("auto", torch.device("cpu")) == "chunked"


def test_broken_backend_is_an_error_naming_it(monkeypatch, fresh_registry):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs Triton installed, so that its op module is what fails")
    monkeypatch.setitem(sys.modules, "edgekd.kernels.shared_head_op", None)  # importing the op module now fails
    with pytest.raises(EdgekdError, match=r"loss backend 'triton' failed to load: \w*Error") as exc:
        resolve_backend("triton", torch.device("cuda"))
    assert isinstance(exc.value.__cause__, ImportError)
    with pytest.raises(EdgekdError, match="failed to load"):  # remembered, not retried into a half-registered op
        resolve_backend("triton", torch.device("cuda"))
    with pytest.warns(EdgekdWarning, match="using chunked, not triton: loss backend 'triton' failed to load"):
        assert resolve_backend("auto", torch.device("cuda")) == "chunked"


def test_a_sweep_registered_once_is_a_loss_backend_and_a_shard_sweep(monkeypatch):
    """One entry in ``edgekd.kernels.sweeps.SWEEPS`` is all a blocked backend needs: it is listed and loads as a loss
    backend here, and the class-sharded op accepts it (tests/distributed/test_sharded_head_loss.py runs it on 2
    ranks)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
    monkeypatch.setattr(sys, "path", sys.path)
    import third_sweep  # tests/distributed/third_sweep.py: the chunked sweep's code at 3-class blocks, its own op

    monkeypatch.setitem(SWEEPS, "third", third_sweep.SWEEP)
    monkeypatch.delitem(registry.LOSS_BACKENDS, "third", raising=False)
    assert "third" in list_loss_backends()
    check_sharded_backend("third")  # no error
    g = torch.Generator().manual_seed(0)
    z, z_t, W = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(20, 8, generator=g) * 0.1
    labels = torch.randint(0, 20, (6,), generator=g)
    weights = LossWeights(ce=1.0, kd=0.5, th_ce=0.3, th_kd=0.2, T=2.0)
    totals = {
        backend: shared_head_loss(z.double(), labels, W_s=W.double(), W_t=0.5 * W.double(), z_t=z_t.double(),
                                  head=HeadSpec("arcface", 16.0, 0.5), weights=weights, backend=backend)[0]
        for backend in ("reference", "third")
    }  # fmt: skip
    # float64: the same formulas in 3-class blocks (C = 20, s = 16): other sum orders, ≲ C·u·s ≈ 4e-14 (u = 1.1e-16)
    torch.testing.assert_close(totals["third"], totals["reference"], rtol=1e-12, atol=1e-12)
