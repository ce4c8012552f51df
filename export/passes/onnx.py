"""PyTorch -> ONNX: dynamo export with a dynamic batch axis named ``batch`` (or a fixed batch on request), BatchNorm
folded, metadata, full check.

The exporter's optimizer (``optimize=True``, the default) folds BatchNorm into a preceding Conv or Gemm. What it leaves
is handled by ``fold_batchnorm``: a BatchNorm that feeds a flatten and then a Gemm (iResNet's ``bn2 -> fc``) is folded
into the Gemm exactly. A BatchNorm in front of a zero-padded Conv (iResNet's pre-activation ``bn1``) cannot be folded
exactly, because padding happens after the affine map; it stays and ``readiness`` reports it (TensorRT runs it as a
Scale layer).

Metadata (``metadata_props``, all strings; lists and numbers JSON-encoded) describes the input contract so that a
runtime needs nothing but the file: ``input_size``, ``channel_order``, ``mean``/``std`` on the [0, 1] pixel scale,
``embed_dim``, ``edgekd_version``, ``source_sha256``, ``precision``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from edgekd.errors import EdgekdError
from edgekd.version import __version__

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "DEFAULT_OPSET",
    "export_onnx",
    "fold_batchnorm",
    "model_metadata",
    "set_metadata",
    "name_batch_axis",
    "default_opset",
    "read_metadata",
    "check_onnx",
    "save_onnx",
    "load_onnx",
]

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
DEFAULT_OPSET = 20  # torch 2.14's default; TensorRT 10.x and 11.x parsers accept it (export.md §1.6)
PIXEL_SCALE = "uint8 / 255, then (x - mean) / std per channel"


def model_metadata(cfg, *, precision: str = "fp32", source_sha256: str | None = None, **extra: Any) -> dict[str, str]:
    """The ``metadata_props`` entries for a model with config ``cfg`` (a ``ModelCfg``).

    Args:
        cfg: the backbone's ``ModelCfg``.
        precision: ``fp32``, ``fp16`` or ``int8``.
        source_sha256: hash of the checkpoint the model came from.
        **extra: more entries; non-strings are JSON-encoded.
    """
    meta: dict[str, Any] = {
        "edgekd_version": __version__,
        "model": cfg.name,
        "model_kwargs": dict(cfg.kwargs),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_size": list(cfg.input_size),
        "channel_order": cfg.channel_order,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "pixel_scale": PIXEL_SCALE,
        "embed_dim": cfg.embed_dim,
        "precision": precision,
        "source_sha256": source_sha256 or "unknown",
        **extra,
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    """Replace or add ``meta`` entries in ``model.metadata_props`` (in place)."""
    current = {p.key: p.value for p in model.metadata_props}
    current.update(meta)
    del model.metadata_props[:]
    for key, value in current.items():
        model.metadata_props.add(key=key, value=value)


def read_metadata(model: onnx.ModelProto | str | os.PathLike) -> dict[str, Any]:
    """``metadata_props`` as a dict, JSON values decoded (strings that are not JSON stay strings)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except ValueError:
            out[prop.key] = prop.value
    return out


def export_onnx(
    model: torch.nn.Module,
    cfg,
    *,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
    legacy_exporter: bool = False,
    static_batch: int | None = None,
) -> onnx.ModelProto:
    """Export ``model`` (normalized ``(B, C, H, W)`` float32 -> ``(B, D)``) to an in-memory, checked ONNX model.

    Args:
        model: the backbone; it is exported in eval mode on the CPU in float32.
        cfg: its ``ModelCfg`` (input size).
        opset: ONNX opset; the dynamo exporter translates at 18+ and down-converts below that.
        metadata: ``metadata_props`` to set (see ``model_metadata``).
        legacy_exporter: use the deprecated TorchScript exporter (``dynamo=False``); an explicit escape hatch only.
        static_batch: fix the batch axis at this size instead of leaving it dynamic (for runtimes such as NNAPI or
            CoreML that only accelerate fixed shapes).

    Returns:
        The model with input ``input: (batch, C, H, W)`` and output ``embedding: (batch, D)`` (``batch`` is
        ``static_batch`` when given), weights inside.

    Raises:
        EdgekdError: the exporter failed (the first line of its error is kept).
    """
    model = model.eval().float().cpu()
    if static_batch is not None and static_batch < 1:
        raise EdgekdError(f"the static batch must be at least 1, got {static_batch}")
    example = torch.randn(static_batch or 2, *cfg.input_size)  # dynamic: batch 2, torch.export specializes 0 and 1
    batch_axis = {0: "batch"} if static_batch is None else None
    quiet = io.StringIO()
    try:
        with (
            torch.no_grad(),
            contextlib.redirect_stdout(quiet),
            warnings.catch_warnings(),
            _quiet_loggers(_EXPORTER_LOGGERS),
        ):
            # torch 2.11's run_decompositions deep-copies pytree LeafSpecs, and each copy prints a FutureWarning
            # ("`isinstance(treespec, LeafSpec)` is deprecated") on stderr; torch 2.14 no longer does.
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
            if legacy_exporter:
                buf = io.BytesIO()
                torch.onnx.export(
                    model,
                    (example,),
                    buf,
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: batch_axis, OUTPUT_NAME: batch_axis} if batch_axis else None,
                )
                proto = onnx.load_from_string(buf.getvalue())
            else:
                program = torch.onnx.export(
                    model,
                    (example,),
                    dynamo=True,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},) if batch_axis else None,
                    external_data=False,
                    optimize=True,
                    verbose=False,
                )
                proto = program.model_proto
    except Exception as exc:  # the exporter raises many types; the user needs the first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgekdError(f"ONNX export of {cfg.name!r} failed: {first[:300]}") from exc
    written = default_opset(proto)
    if written != opset:
        # Below 18 the dynamo exporter down-converts; where that fails it keeps opset 18 and only logs it.
        raise EdgekdError(
            f"the ONNX exporter cannot write opset {opset} for {cfg.name!r} (its conversion left opset {written}); "
            f"use --opset {written} or higher, which needs no conversion"
        )
    proto, _ = fold_batchnorm(proto)
    name_batch_axis(proto)
    if metadata:
        set_metadata(proto, metadata)
    check_onnx(proto)
    return proto


# The exporter's own loggers: a failed down-conversion logs a traceback there and goes on at opset 18, which
# export_onnx then refuses in one line (default_opset); the log would only repeat it at length.
_EXPORTER_LOGGERS = ("torch.onnx", "onnxscript")


@contextlib.contextmanager
def _quiet_loggers(names: tuple[str, ...]):
    """Only errors from the loggers ``names`` while the block runs."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def default_opset(model: onnx.ModelProto) -> int | None:
    """The version of the default (``ai.onnx``) operator set the model imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def name_batch_axis(model: onnx.ModelProto) -> None:
    """Make sure the first axis of every graph input and output is the symbolic ``batch`` (the legacy exporter and
    the optimizer may leave other names behind)."""
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"


def check_onnx(model: onnx.ModelProto) -> None:
    """``onnx.checker`` full check (with strict shape inference); a failure is a one-line EdgekdError."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise EdgekdError(f"the exported ONNX model is invalid: {str(exc).strip().splitlines()[0][:300]}") from exc


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Serialize ``model`` into one file at ``path`` (no external data; the caller does the atomic rename)."""
    path = Path(path)
    path.write_bytes(model.SerializeToString())
    return path


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file; a missing, empty, unreadable or graph-less file is a one-line EdgekdError naming it."""
    path = Path(path)
    if not path.is_file():
        raise EdgekdError(f"ONNX model {path} does not exist")
    if path.stat().st_size == 0:
        raise EdgekdError(f"ONNX model {path} is empty")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError, OSError, missing external data
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise EdgekdError(f"cannot read ONNX model {path} (corrupt or not ONNX): {reason}") from None
    if not model.graph.node or not model.graph.output:
        raise EdgekdError(f"cannot read ONNX model {path}: it holds no graph (corrupt or not ONNX)")
    return model


# ---------------------------------------------------------------------------------------------------------------------
# BatchNorm folding on the ONNX graph


def _bn_affine(init: dict[str, np.ndarray], node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
    """(a, b) with ``BN(x) = a * x + b`` per channel, or None if any BN input is not a constant."""
    if any(name not in init for name in node.input[1:5]):
        return None
    scale, bias, mean, var = (init[name].astype(np.float64) for name in node.input[1:5])
    eps = next((attr.f for attr in node.attribute if attr.name == "epsilon"), 1e-5)
    a = scale / np.sqrt(var + eps)
    return a, bias - mean * a


def fold_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold inference-mode BatchNormalization nodes into a neighbouring Conv or Gemm where that is exact.

    Handled: ``Conv -> BN`` (BN into the conv's weight and bias), and ``BN -> Reshape/Flatten (to 2-D) -> Gemm``
    (BN into the Gemm's weight and bias). Each intermediate tensor must have exactly one consumer.

    Args:
        model: an ONNX model with constant BN parameters; modified in place.

    Returns:
        The model and the number of BatchNormalization nodes removed.
    """
    graph = model.graph
    folded = 0
    while True:
        inferred = onnx.shape_inference.infer_shapes(model)
        shapes = {
            v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        }
        init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        producer = {out: node for node in graph.node for out in node.output}
        outputs = {o.name for o in graph.output}
        changed = False
        for bn in list(graph.node):
            if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
                continue
            affine = _bn_affine(init, bn)
            if affine is None:
                continue
            if _fold_into_conv(model, bn, affine, init, producer, consumers, outputs) or _fold_into_gemm(
                model, bn, affine, init, consumers, outputs, shapes
            ):
                folded += 1
                changed = True
                break
        if not changed:
            break
    _drop_unused_initializers(model)
    return model, folded


def _replace_initializer(model: onnx.ModelProto, name: str, value: np.ndarray, dtype: np.dtype) -> str:
    """Add ``value`` as a fresh initializer (never overwrite: the optimizer shares identical constants)."""
    taken = {t.name for t in model.graph.initializer}
    new = name
    i = 0
    while new in taken:
        i += 1
        new = f"{name}_bnfold{i}"
    model.graph.initializer.append(numpy_helper.from_array(value.astype(dtype), new))
    return new


def _fold_into_conv(model, bn, affine, init, producer, consumers, outputs) -> bool:
    conv = producer.get(bn.input[0])
    if conv is None or conv.op_type != "Conv" or conv.input[1] not in init:
        return False
    if len(consumers.get(conv.output[0], [])) != 1 or conv.output[0] in outputs:
        return False
    a, b = affine
    w = init[conv.input[1]]
    bias = init[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0])
    new_w = w.astype(np.float64) * a.reshape(-1, *([1] * (w.ndim - 1)))
    new_b = bias * a + b
    w_name = _replace_initializer(model, conv.input[1], new_w, w.dtype)
    b_name = _replace_initializer(model, f"{conv.input[1]}.bias", new_b, w.dtype)
    data = conv.input[0]
    del conv.input[:]
    conv.input.extend([data, w_name, b_name])
    conv.output[0] = bn.output[0]
    model.graph.node.remove(bn)
    return True


def _fold_into_gemm(model, bn, affine, init, consumers, outputs, shapes) -> bool:
    x_shape = shapes.get(bn.input[0])
    if not x_shape or any(d is None for d in x_shape[1:]) or bn.output[0] in outputs:
        return False
    flat = consumers.get(bn.output[0], [])
    if len(flat) != 1 or flat[0].op_type not in ("Reshape", "Flatten") or flat[0].output[0] in outputs:
        return False
    flat = flat[0]
    if flat.input[0] != bn.output[0]:
        return False
    out_shape = shapes.get(flat.output[0])
    features = int(np.prod(x_shape[1:]))
    if not out_shape or len(out_shape) != 2 or out_shape[1] != features:
        return False
    gemms = consumers.get(flat.output[0], [])
    if len(gemms) != 1 or gemms[0].op_type != "Gemm" or gemms[0].input[0] != flat.output[0]:
        return False
    gemm = gemms[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    if attrs.get("transA", 0) or gemm.input[1] not in init:
        return False
    a, b = affine
    spatial = features // len(a)
    a_exp, b_exp = np.repeat(a, spatial), np.repeat(b, spatial)  # NCHW flattening: k = c * H * W + h * W + w
    w = init[gemm.input[1]]
    w64 = w.astype(np.float64)
    w_nk = w64 if attrs.get("transB", 0) else w64.T  # (N, K)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    c = init.get(gemm.input[2]) if len(gemm.input) > 2 and gemm.input[2] else None
    if len(gemm.input) > 2 and gemm.input[2] and c is None:
        return False
    new_c = (beta * c.astype(np.float64) if c is not None else 0.0) + alpha * (w_nk @ b_exp)
    new_w_nk = w_nk * a_exp[None, :]
    new_w = new_w_nk if attrs.get("transB", 0) else new_w_nk.T
    w_name = _replace_initializer(model, gemm.input[1], new_w, w.dtype)
    c_name = _replace_initializer(model, f"{gemm.input[1]}.bias", np.broadcast_to(new_c, (w_nk.shape[0],)), w.dtype)
    gemm.input[1] = w_name
    if len(gemm.input) > 2:
        gemm.input[2] = c_name
    else:
        gemm.input.append(c_name)
    for attr in gemm.attribute:
        if attr.name == "beta":
            attr.f = 1.0
    flat.input[0] = bn.input[0]
    model.graph.node.remove(bn)
    return True


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
