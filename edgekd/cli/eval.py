"""``edgekd eval``: verification (pairs, .bin, IJB-B/C) or classification accuracy of a checkpoint, an ONNX model, an
ExecuTorch program (``.pte``, run by ExecuTorch's runtime) or a TensorRT engine.

An ONNX file without edgekd's metadata (an arcface_torch ``torch2onnx`` export, an insightface model-zoo file) is read
the insightface way (``edgekd.export.contract``): input size from the graph, RGB, ``(x - 127.5) / 127.5``; ``--mean``,
``--std`` and ``--image-size`` override it. Accuracy and TAR print as percentages; ``eval.json`` keeps fractions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from edgekd.atomic import write_json
from edgekd.bundle import load_bundle
from edgekd.cli.export import CHECKPOINT_SUFFIXES, EXPORTED_SUFFIXES, OutputDir, PixelValues, existing_file
from edgekd.cli.options import DeviceType
from edgekd.data import create_dataset, create_pairs
from edgekd.errors import EdgekdError
from edgekd.eval.embed import evaluate_pairs
from edgekd.eval.ijb import evaluate_ijb
from edgekd.eval.metrics import far_rule_reason, resolvable_fars
from edgekd.eval.report import classify_bundle, format_tar_line, format_verification
from edgekd.eval.roc_plot import plot_roc
from edgekd.export.contract import EDGEKD_SOURCE, override_contract
from edgekd.export.runtimes import file_kind, open_runtime
from edgekd.utils.device import resolve_device
from edgekd.utils.hashing import file_sha256


@dataclass
class OpenedModel:
    """A model ready to embed: its forward callable and the input it expects."""

    forward: Any
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bundle: Any = None  # the checkpoint's bundle (None for exported models)
    source: str = "checkpoint"  # where the input contract came from

    def describe(self) -> dict:
        """The input contract as eval.json records it (mean and std on the [0, 1] pixel scale)."""
        return {"size": list(self.input_size), "mean": list(self.mean), "std": list(self.std), "source": self.source}


def _open_exported(path: Path, device: str, image_size, mean, std, log) -> OpenedModel:
    """An ONNX file, ExecuTorch program or engine with its input contract (recorded, or insightface's), overridden by
    the options."""
    runtime = open_runtime(path, device=device)
    contract = getattr(runtime, "contract", None)
    if contract is None:  # a TensorRT engine: its sidecar JSON is the only record
        if runtime.input_size is None and image_size is None:
            raise EdgekdError(f"{path.name} has no sidecar JSON with its input size; pass --image-size")
        size = runtime.input_size or (3, image_size, image_size)
        if image_size is not None and size[1:] != (image_size, image_size):
            raise EdgekdError(f"--image-size {image_size} does not fit {path.name}, built for {size[1]}x{size[2]}")
        mean_01 = tuple(m / 255 for m in mean) if mean else runtime.mean or (0.5,) * size[0]
        std_01 = tuple(s / 255 for s in std) if std else runtime.std or (0.5,) * size[0]
        return OpenedModel(runtime, size, mean_01, std_01, source="engine sidecar")
    contract = override_contract(contract, path.name, image_size=image_size, mean=mean, std=std)
    if contract.source != EDGEKD_SOURCE:
        log(
            f"note: {path.name} has no edgekd metadata; using insightface conventions: {contract.describe()} "
            "(override with --image-size/--mean/--std)"
        )
    for note in runtime.notes:
        log(f"note: {note}")
    runtime.set_contract(contract)
    return OpenedModel(runtime, contract.input_size, contract.mean, contract.std, source=contract.source)


def _open_checkpoint(path: Path, arch, device: str, image_size, mean, std) -> OpenedModel:
    """A checkpoint's backbone; its architecture fixes the input size, ``--mean``/``--std`` may override."""
    bundle = load_bundle(path, model=arch)
    cfg = bundle.cfg
    c, h, w = cfg.input_size
    if image_size is not None and (h, w) != (image_size, image_size):
        raise EdgekdError(
            f"--image-size {image_size} does not fit {path.name}, a {cfg.name} built for {h}x{w} images; "
            f"drop --image-size or pass --image-size {h}"
        )
    mean_01 = tuple(m / 255 for m in mean) * (c if len(mean) == 1 else 1) if mean else tuple(cfg.mean)
    std_01 = tuple(s / 255 for s in std) * (c if len(std) == 1 else 1) if std else tuple(cfg.std)
    backbone = bundle.backbone.to(resolve_device(device)).eval()
    return OpenedModel(backbone, (c, h, w), mean_01, std_01, bundle)


def _check_images_fit(images_shape, model: OpenedModel, source: str, model_name: str) -> None:
    """One line naming both sizes when the data's images are not the size the model takes."""
    c, h, w = model.input_size
    got_c, got_h, got_w = (int(v) for v in images_shape[-3:])
    if (got_h, got_w) != (h, w):
        raise EdgekdError(
            f"{source} has {got_h}x{got_w} images but {model_name} takes {h}x{w}; make the data {h}x{w} "
            f"(drop image_size= from the --pairs spec) or, for a model that accepts {got_h}x{got_w}, "
            f"pass --image-size {got_h}"
        )
    if got_c != c:
        raise EdgekdError(f"{source} has {got_c}-channel images but {model_name} takes {c} channels")


def _pair_images_shape(pair_set) -> tuple[int, ...]:
    images = pair_set.images
    if hasattr(images, "shape"):
        return tuple(images.shape)
    first = images[0]
    return tuple((first[0] if isinstance(first, (tuple, list)) else first).shape)


def _roc_label(pair_set, result: dict) -> str:
    """A legend entry a reader understands: the pair set's name, its size and its accuracy."""
    return f"{pair_set.name}: {len(pair_set)} pairs, accuracy {100 * result['accuracy']:.1f}%"


def _check_pairs_exist(ctx, param, values):
    """``--pairs`` files are looked for now, before the model is loaded."""
    for spec in values:
        if not spec.strip().startswith("synthetic"):
            existing_file((".bin",), "pair file")(ctx, param, spec)
    return values


@click.command("eval")
@click.argument(
    "model_path",
    metavar="MODEL",
    type=click.Path(dir_okay=False),
    callback=existing_file((*CHECKPOINT_SUFFIXES, *EXPORTED_SUFFIXES), "model"),
)
@click.option("--model", "arch", default=None, help="architecture of a plain arcface_torch state_dict MODEL (e.g. mbf)")
@click.option(
    "--pairs",
    multiple=True,
    callback=_check_pairs_exist,
    help="verification pairs: synthetic[:k=v], or an insightface .bin (repeatable)",
)
@click.option(
    "--ijb", type=click.Path(exists=True, file_okay=False), default=None, help="IJB-B/C root (meta/, loose_crop/)"
)
@click.option("--data", default=None, help="classification test data (e.g. fmnist); needs a checkpoint with a head")
@click.option("--split", default="test", help="split of --data to score")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True, help="images per forward")
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    default=None,
    help="input height = width for an ONNX model that does not record it (default: the graph's or metadata's)",
)
@click.option(
    "--mean",
    type=PixelValues(),
    default=None,
    help="input mean on the 0-255 scale, one value or one per channel "
    "(default: the model's; insightface's 127.5 for foreign ONNX)",
)
@click.option(
    "--std",
    type=PixelValues(positive=True),
    default=None,
    help="input std on the 0-255 scale, one value or one per channel "
    "(default: the model's; insightface's 127.5 for foreign ONNX)",
)
@click.option("--device", type=DeviceType(), default="auto", show_default=True, help="auto, cpu or cuda[:N]")
@click.option(
    "--out", type=OutputDir(), default="runs/eval", show_default=True, help="folder for eval.json, roc.png, IJB files"
)
def command(model_path, arch, pairs, ijb, data, split, batch_size, image_size, mean, std, device, out) -> None:
    """Evaluate MODEL (a checkpoint, a plain arcface_torch state_dict with --model, an ONNX file, an ExecuTorch .pte
    or a TensorRT engine)."""
    if not (pairs or ijb or data):
        pairs = ("synthetic",)
    path = Path(model_path)
    if file_kind(path) == "checkpoint":
        model = _open_checkpoint(path, arch, device, image_size, mean, std)
    else:
        model = _open_exported(path, device, image_size, mean, std, click.echo)
    out = Path(out)
    report: dict = {"model": str(model_path), "input": model.describe()}
    curves = {}
    dev = resolve_device(device)
    for spec in pairs:
        result, label = _evaluate_pairs(spec, model, path.name, batch_size, dev)
        report[spec] = _pairs_report(result)
        curves[label] = (result["fpr"], result["tpr"])
    if ijb:
        report["ijb"] = _evaluate_ijb(ijb, model, model_path, out, batch_size, dev)
    if data:
        report[f"{data}:{split}"] = _classify(data, split, model, device, batch_size)
    if curves:
        plot_roc(curves, out / "roc.png", title=f"Verification ROC of {path.name}")
        report["roc_plot"] = str(out / "roc.png")
    write_json(out / "eval.json", report)
    click.echo(f"report: {out / 'eval.json'}")


def _evaluate_pairs(spec: str, model: OpenedModel, model_name: str, batch_size: int, device) -> tuple[dict, str]:
    """Verify one ``--pairs`` set, print its line, return the metrics and the ROC legend label."""
    c, h, _ = model.input_size
    synthetic = spec.strip().startswith("synthetic")
    pair_set = create_pairs(spec, image_size=h, **({"channels": c} if synthetic else {}))
    _check_images_fit(_pair_images_shape(pair_set), model, f"--pairs {spec}", model_name)
    result = evaluate_pairs(
        model.forward, pair_set, mean=model.mean, std=model.std, batch_size=batch_size, device=device
    )
    tars = {far: result["tar_at_far"][far] for far in result["tar_ci"]}  # the FARs the pair set resolves
    line = format_verification(
        spec, result["accuracy"], result["accuracy_ci"], tars, result["tar_ci"], impostors=result["impostors"]
    )
    click.echo(line)
    return result, _roc_label(pair_set, result)


def _pairs_report(result: dict) -> dict:
    """eval.json's entry for a pair set: fractions; ``acc_ci`` and ``tar_ci`` are 95 % intervals ``[low, high]``
    (Student-t over the fold accuracies; bootstrap over pairs); TAR only at the FARs the impostor count resolves,
    the others named in ``fars_left_out`` with the rule."""
    report = {
        "accuracy": result["accuracy"],
        "std": result["std"],
        "acc_ci": list(result["accuracy_ci"]),
        "tar_at_far": {str(far): result["tar_at_far"][far] for far in result["tar_ci"]},
        "tar_ci": {str(far): list(ci) for far, ci in result["tar_ci"].items()},
        "impostor_pairs": result["impostors"],
    }
    if result["fars_left_out"]:
        report["fars_left_out"] = _left_out(result["fars_left_out"], result["impostors"])
    return report


def _left_out(fars, impostors: int) -> dict:
    """eval.json's note of the FARs a protocol's impostor count does not resolve, with the rule."""
    return {"fars": [str(far) for far in fars], "reason": far_rule_reason(impostors)}


def _evaluate_ijb(ijb: str, model: OpenedModel, model_path, out: Path, batch_size: int, device) -> dict:
    result = evaluate_ijb(
        model.forward,
        ijb,
        out / "ijb",
        batch_size=batch_size,
        mean=model.mean,
        std=model.std,
        image_size=model.input_size[1],
        model_key=file_sha256(model_path),
        device=device,
    )
    impostors = result["num_pairs"] - result["num_genuine"]
    kept, dropped = resolvable_fars(impostors, [float(far) for far in result["tar_at_far"]])
    tars = {str(far): tar for far, tar in result["tar_at_far"].items() if float(far) in kept}
    click.echo(format_tar_line("IJB", {float(far): tar for far, tar in tars.items()}))
    report = {"tar_at_far": tars, "impostor_pairs": impostors}
    if dropped:
        report["fars_left_out"] = _left_out(dropped, impostors)
    return report


def _classify(data: str, split: str, model: OpenedModel, device: str, batch_size: int) -> dict:
    if model.bundle is None or model.bundle.head is None:
        raise EdgekdError("classification accuracy needs an edgekd checkpoint with a head, not an exported model")
    result = classify_bundle(model.bundle, create_dataset(data, split=split), device=device, batch_size=batch_size)
    click.echo(f"{data} [{split}]: top-1 (%) {100 * result['top1']:.2f}")
    return result
