"""The input contract of an ONNX model: image size, normalization, embedding width and batch.

An edgekd export records its contract in ``metadata_props`` (``edgekd.export.passes.onnx.model_metadata``). A foreign
file (an arcface_torch ``torch2onnx`` export, an insightface model-zoo model) records nothing, so the contract follows
insightface's own conventions (``insightface.model_zoo.ArcFaceONNX``, reference/face.md §1.4 and §6.2):

- the input size is the graph's input shape ``[N, C, H, W]``; the embedding width is the output's last axis;
- pixels are RGB and normalized as ``(x - 127.5) / 127.5``, except that a graph whose first 8 nodes are named
  ``Sub``/``_minus`` *and* ``Mul``/``_mul`` normalizes itself (old MXNet conversions) and takes raw pixels.

Means and standard deviations here are on edgekd's [0, 1] pixel scale (``edgekd.data.transforms.normalize``), so
insightface's 127.5 / 127.5 is 0.5 / 0.5. ``--mean``/``--std``/``--image-size`` override either source; what the graph
fixes (a static C, H, W or batch) cannot be overridden.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import onnx

from edgekd.errors import EdgekdError
from edgekd.export.passes.onnx import read_metadata

__all__ = [
    "EDGEKD_SOURCE",
    "INSIGHTFACE_SOURCE",
    "InputContract",
    "graph_io",
    "read_contract",
    "contract_from_graph",
    "override_contract",
    "graph_precision",
]

EDGEKD_SOURCE = "edgekd metadata"
INSIGHTFACE_SOURCE = "insightface conventions"
INSIGHTFACE_MEAN = 127.5 / 255.0  # (x - 127.5) / 127.5 on the 0-255 scale is (x/255 - 0.5) / 0.5
INSIGHTFACE_STD = 127.5 / 255.0
RAW_PIXELS_STD = 1.0 / 255.0  # (x/255 - 0) / (1/255) = x: the graph gets 0-255 pixels


@dataclass(frozen=True)
class InputContract:
    """What a model expects as input and returns.

    Attributes:
        input_size: ``(C, H, W)``, or None when neither the graph nor the metadata says.
        mean: per-channel mean on the [0, 1] pixel scale.
        std: per-channel std on the [0, 1] pixel scale.
        embed_dim: width ``D`` of the ``(B, D)`` output, None when the graph leaves it open.
        batch: the batch the graph fixes, None when the batch axis is dynamic.
        graph_size: the ``(C, H, W)`` the graph itself fixes (None when any of them is symbolic).
        source: ``EDGEKD_SOURCE`` or ``INSIGHTFACE_SOURCE``.
        channel_order: ``RGB``, ``BGR`` or ``L``.
        raw_pixels: insightface's Sub/Mul heuristic found normalization inside the graph.
    """

    input_size: tuple[int, int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    embed_dim: int | None
    batch: int | None
    graph_size: tuple[int, int, int] | None
    source: str
    channel_order: str = "RGB"
    raw_pixels: bool = False

    def describe(self) -> str:
        """One line: size, order, normalization on the 0-255 scale, embedding width, batch."""
        size = "x".join(map(str, self.input_size)) if self.input_size else "open"
        mean = "/".join(f"{255 * m:g}" for m in sorted(set(self.mean)))
        std = "/".join(f"{255 * s:g}" for s in sorted(set(self.std)))
        dim = f"{self.embed_dim}-d" if self.embed_dim else "open-width"
        batch = f"fixed batch {self.batch}" if self.batch else "dynamic batch"
        return f"{size} {self.channel_order} input, (x - {mean}) / {std}, {dim} embedding, {batch}"


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    """Static axis lengths of a graph input or output; None for a symbolic or unknown axis."""
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in value.type.tensor_type.shape.dim
    ]


def graph_io(model: onnx.ModelProto) -> tuple[list[int | None], list[int | None]]:
    """Shapes of the graph's one image input (initializers listed as inputs are skipped) and its one embedding output.

    A recognition model maps one image batch to one ``(B, D)`` embedding; a graph with more inputs or outputs, or an
    output of another rank, is refused in one line: scoring its first output as if it were the embedding would report
    numbers about something else."""
    weights = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in weights]
    outputs = list(model.graph.output)
    if not inputs or not outputs:
        raise EdgekdError("the model has no graph inputs or outputs (an empty or non-ONNX file?)")
    for kind, values in (("inputs", inputs), ("outputs", outputs)):
        if len(values) > 1:
            names = ", ".join(v.name for v in values)
            raise EdgekdError(
                f"the model has {len(values)} {kind} ({names}); edgekd evaluates recognition models with one image "
                "input and one (batch, D) embedding output: export the embedding branch alone"
            )
    output = _dims(outputs[0])
    if output and len(output) != 2:  # a graph that records no output shape is read by its contract
        raise EdgekdError(
            f"the model's output {outputs[0].name} has {len(output)} dimensions {output}; a recognition model's "
            "embedding is (batch, D)"
        )
    return _dims(inputs[0]), output


def _json(meta: dict[str, Any], key: str) -> Any:
    value = meta.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _normalizes_itself(node_names: Sequence[str]) -> bool:
    """insightface's rule (``ArcFaceONNX.__init__``): Sub and Mul among the first 8 node names -> raw pixels."""
    first = list(node_names)[:8]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in first)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in first)
    return has_sub and has_mul


def contract_from_graph(
    input_shape: Sequence[int | None],
    output_shape: Sequence[int | None],
    metadata: dict[str, Any],
    node_names: Sequence[str] = (),
) -> InputContract:
    """The contract of a model with these I/O shapes and ``metadata_props``.

    Args:
        input_shape: ``[N, C, H, W]`` with None for symbolic axes.
        output_shape: ``[N, D]`` (or longer) with None for symbolic axes.
        metadata: ``metadata_props`` (values JSON strings or decoded).
        node_names: the graph's node names in order (for insightface's self-normalization rule).

    Raises:
        EdgekdError: the input is not a 4-D image tensor.
    """
    if len(input_shape) != 4:
        raise EdgekdError(f"the model's input has shape {list(input_shape)}; an image model takes [N, C, H, W]")
    batch = input_shape[0]
    graph_size = tuple(input_shape[1:]) if all(d is not None for d in input_shape[1:]) else None
    embed_dim = output_shape[-1] if output_shape else None
    if metadata.get("edgekd_version") is not None and metadata.get("mean") is not None:
        try:
            recorded = _json(metadata, "input_size")
            return InputContract(
                input_size=tuple(int(v) for v in recorded) if recorded else graph_size,
                mean=tuple(float(v) for v in _json(metadata, "mean")),
                std=tuple(float(v) for v in _json(metadata, "std")),
                embed_dim=int(_json(metadata, "embed_dim") or 0) or embed_dim,
                batch=batch,
                graph_size=graph_size,
                source=EDGEKD_SOURCE,
                channel_order=str(metadata.get("channel_order", "RGB")),
            )
        except (TypeError, ValueError):
            pass  # unreadable metadata: treat the file as foreign
    channels = input_shape[1] or 3
    raw = _normalizes_itself(node_names)
    return InputContract(
        input_size=graph_size,
        mean=(0.0 if raw else INSIGHTFACE_MEAN,) * channels,
        std=(RAW_PIXELS_STD if raw else INSIGHTFACE_STD,) * channels,
        embed_dim=embed_dim,
        batch=batch,
        graph_size=graph_size,
        source=INSIGHTFACE_SOURCE,
        raw_pixels=raw,
    )


def read_contract(model: onnx.ModelProto, name: str | None = None) -> InputContract:
    """The contract of a loaded ONNX model (see the module docstring).

    Raises:
        EdgekdError: the graph is no image model; the one-line message starts with ``name`` when given.
    """
    try:
        input_shape, output_shape = graph_io(model)
        names = [n.name for n in model.graph.node[:8]]
        return contract_from_graph(input_shape, output_shape, read_metadata(model), names)
    except EdgekdError as exc:
        if name is None:
            raise
        raise EdgekdError(f"{name}: {exc}") from None


def _per_channel(values: Sequence[float], channels: int, option: str) -> tuple[float, ...]:
    if len(values) == 1:
        return tuple(values) * channels
    if len(values) != channels:
        raise EdgekdError(f"{option} has {len(values)} values but the model takes {channels} channels")
    return tuple(values)


def override_contract(
    contract: InputContract,
    name: str,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> InputContract:
    """``contract`` with the user's ``--image-size``/``--mean``/``--std`` (0-255 pixel scale) applied.

    Raises:
        EdgekdError: the graph fixes another input size, or the result still has no input size.
    """
    size = contract.input_size
    if image_size is not None:
        fixed = contract.graph_size
        if fixed is not None and fixed[1:] != (image_size, image_size):
            raise EdgekdError(
                f"--image-size {image_size} does not fit {name}: its graph takes {fixed[1]}x{fixed[2]} images; "
                f"drop --image-size or pass --image-size {fixed[1]}"
            )
        channels = size[0] if size else (fixed[0] if fixed else 3)
        size = (channels, image_size, image_size)
    if size is None:
        raise EdgekdError(f"{name} leaves its input height and width open and records no input size; pass --image-size")
    channels = size[0]
    new_mean = _per_channel([m / 255.0 for m in mean], channels, "--mean") if mean else contract.mean
    new_std = _per_channel([s / 255.0 for s in std], channels, "--std") if std else contract.std
    return replace(contract, input_size=size, mean=new_mean, std=new_std)


def graph_precision(model: onnx.ModelProto) -> str:
    """``int8`` for a Q/DQ graph, ``fp16`` when most float weights are FP16, else ``fp32`` (for files without
    edgekd's ``precision`` metadata)."""
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return "int8"
    floats = [
        t.data_type
        for t in model.graph.initializer
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    ]
    half = sum(t == onnx.TensorProto.FLOAT16 for t in floats)
    return "fp16" if floats and half * 2 > len(floats) else "fp32"
