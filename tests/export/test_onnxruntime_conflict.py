"""Both ONNX Runtime distributions installed is reported with the command that fixes it (pip check stays quiet)."""

from importlib import metadata

import pytest

from edgekd.utils import env


def _installed(names):
    def version(dist):
        if dist in names:
            return "1.0"
        raise metadata.PackageNotFoundError(dist)

    return version


@pytest.mark.parametrize(
    "names, conflict",
    [({"onnxruntime"}, False), ({"onnxruntime-gpu"}, False), ({"onnxruntime", "onnxruntime-gpu"}, True)],
)
def test_conflict_only_when_both_distributions_are_installed(monkeypatch, names, conflict):
    monkeypatch.setattr(env.metadata, "version", _installed(names))
    message = env.onnxruntime_conflict()
    assert (message is not None) == conflict
    if conflict:
        assert "pip uninstall -y onnxruntime onnxruntime-gpu" in message
