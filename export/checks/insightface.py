"""Whether an exported face model loads and runs through insightface's ``model_zoo.get_model``.

``insightface.model_zoo.ModelRouter.get_model`` (python-package/insightface/model_zoo/model_zoo.py) picks the model
class from the first input's shape alone: 5+ outputs -> a detector, 192x192 -> ``Landmark``, 96x96 -> ``Attribute``,
two inputs at 128x128 -> ``INSwapper``, and only a square input of at least 112 that is a multiple of 16 ->
``ArcFaceONNX`` (older releases: exactly 112x112); anything else returns None. ``ArcFaceONNX`` then feeds one aligned
face at a time (batch 1) as an RGB blob ``(x - 127.5) / 127.5`` with three channels and reads a single output.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["insightface_problems"]

_ROUTED_ELSEWHERE = {192: "Landmark", 96: "Attribute"}


def _size_problem(height: int, width: int) -> str | None:
    if height != width:
        return f"model_zoo routes only square inputs to ArcFaceONNX, this one is {height}x{width}"
    if height in _ROUTED_ELSEWHERE:
        return f"model_zoo routes {height}x{height} inputs to its {_ROUTED_ELSEWHERE[height]} model, not ArcFaceONNX"
    if height < 112 or height % 16:
        return f"model_zoo routes only 112x112 and larger multiples of 16 to ArcFaceONNX, this one is {height}x{height}"
    if height != 112:
        return f"older insightface releases route only 112x112 to ArcFaceONNX, this one is {height}x{height}"
    return None


def insightface_problems(
    input_size: Sequence[int],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    channel_order: str = "RGB",
    batch: int | None = None,
    outputs: int = 1,
) -> list[str]:
    """Reasons an ONNX face model with this contract will not load or not run correctly through insightface.

    Args:
        input_size: ``(C, H, W)``.
        mean: per-channel mean on the [0, 1] pixel scale.
        std: per-channel std on the [0, 1] pixel scale.
        channel_order: ``RGB``, ``BGR`` or ``L``.
        batch: the batch the graph fixes, None when dynamic.
        outputs: number of graph outputs.

    Returns:
        Short reasons, empty when the model looks loadable.
    """
    channels, height, width = (int(v) for v in input_size)
    problems = []
    if channels != 3:
        problems.append(f"its input has {channels} channel(s) and insightface feeds 3-channel images")
    size = _size_problem(height, width)
    if size:
        problems.append(size)
    if outputs != 1:
        problems.append(f"ArcFaceONNX reads exactly one output, this model has {outputs}")
    if batch is not None and batch != 1:
        problems.append(f"its batch is fixed at {batch} and ArcFaceONNX runs one face at a time")
    if any(abs(m - 0.5) > 1e-6 for m in mean) or any(abs(s - 0.5) > 1e-6 for s in std):
        problems.append("insightface normalizes with (x - 127.5) / 127.5 and this model expects another mean/std")
    if channel_order not in ("RGB", "L"):
        problems.append(f"insightface feeds RGB and this model expects {channel_order}")
    return problems
