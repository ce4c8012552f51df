"""What the export's gates cost (issue 25, item 6: an INT8 mbf at 112x112 spent 70 s in its task gate): the task gate
runs each model once over each distinct image of the pairs and its mirror; the reference's task metrics are measured
once for every artifact of an export; the PyTorch reference runs in channels_last, on a copy."""

from __future__ import annotations

import copy

import torch

from edgekd.data import create_pairs
from edgekd.eval.embed import evaluate_pairs
from edgekd.export.artifact import Gates
from edgekd.export.pipeline import gate_reference

MEAN, STD = (0.5,) * 3, (0.5,) * 3


class Counted(torch.nn.Module):
    """A model that counts the images it embeds."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return self.inner(x)


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.PReLU(8),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 16),
    )
    return net.eval()


def _setup():
    pairs = create_pairs("synthetic:pairs=200,pair_identities=20,pair_images=5,image_size=16")
    parity = {"synthetic": torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    reference = Counted(_net(0))
    gates = Gates(reference, parity, pairs, MEAN, STD, batches=(1, 4), min_cosine=None, max_drop=100.0, log=print)
    return pairs, parity, reference, gates


def test_the_task_gate_embeds_each_distinct_image_and_its_mirror_once_per_model():
    pairs, parity, reference, gates = _setup()
    candidate = Counted(_net(1))
    report = gates.run(candidate, "int8", "a.onnx")

    distinct = len({img.numpy().tobytes() for img in pairs.images})  # counted here, not by the code under test
    assert distinct < len(pairs.images)  # the pairs reuse images
    views = 2  # each pair image and its mirror (the flip-sum)
    assert reference.images == len(parity["synthetic"]) + views * distinct  # the parity inputs, then the pairs
    assert candidate.images == 2 * len(parity["synthetic"]) + views * distinct  # parity at batch 1 and 4, the pairs
    task = report.task
    assert task.flip is True and report.to_dict()["task"]["flip"] is True
    # the metrics are those of the flip-summed verification protocol, for each model
    for model, metrics in ((reference.inner, task.reference), (candidate.inner, task.candidate)):
        expected = evaluate_pairs(model, pairs, mean=MEAN, std=STD, flip=True, fars=(0.1,))
        assert metrics["accuracy"] == 100.0 * expected["accuracy"]
        assert metrics["tar@far=0.1"] == 100.0 * expected["tar_at_far"][0.1]


def test_the_reference_task_metrics_are_measured_once_for_every_artifact_of_an_export():
    pairs, parity, reference, gates = _setup()
    first = gates.run(Counted(_net(1)), "int8", "a.onnx")
    after_first = reference.images
    second = gates.run(Counted(_net(2)), "int8", "a.plan")

    assert reference.images - after_first == len(parity["synthetic"])  # the parity inputs only, no pair image
    assert second.task.reference == first.task.reference
    assert second.task.candidate != first.task.candidate  # another candidate was measured


def test_the_gate_reference_is_a_channels_last_copy_with_the_model_s_outputs():
    model = _net(0)
    original = copy.deepcopy(model.state_dict())
    reference = gate_reference(model)
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    conv = reference.module[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert model[0].weight.is_contiguous()  # the exported model is left as loaded
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    with torch.inference_mode():
        torch.testing.assert_close(torch.as_tensor(reference(x)), model(x), rtol=1e-5, atol=1e-6)
