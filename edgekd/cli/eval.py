"""``edgekd eval``: verification (pairs, .bin, IJB-B/C) or classification accuracy of a checkpoint or ONNX model."""

from __future__ import annotations

from pathlib import Path

import click


def _open_model(path: str, arch: str | None, device: str):
    """(forward, mean, std, input size, bundle-or-None) for a checkpoint or an exported ONNX / engine file."""
    from edgekd.bundle import load_bundle
    from edgekd.train.loop import resolve_device

    if Path(path).suffix in (".onnx", ".engine", ".plan"):
        from edgekd.export.runtime import open_runtime

        runtime = open_runtime(path, device=device)
        return runtime, runtime.mean, runtime.std, runtime.input_size, None
    bundle = load_bundle(path, model=arch)
    backbone = bundle.backbone.to(resolve_device(device)).eval()
    return backbone, bundle.cfg.mean, bundle.cfg.std, bundle.cfg.input_size, bundle


@click.command("eval")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--model", "arch", default=None, help="architecture of a plain state_dict MODEL (e.g. mbf, r100)")
@click.option("--pairs", multiple=True, help="verification pairs: synthetic[:k=v], or an insightface .bin (repeatable)")
@click.option("--ijb", type=click.Path(file_okay=False), default=None, help="IJB-B/C root folder (meta/, loose_crop/)")
@click.option("--data", default=None, help="classification test data (e.g. fmnist); needs a checkpoint with a head")
@click.option("--split", default="test", help="split of --data to score")
@click.option("--batch-size", type=int, default=128, help="images per forward pass")
@click.option("--device", default="auto", help="auto, cpu or cuda[:N]")
@click.option("--out", default="runs/eval", help="folder for the JSON report, ROC plot and IJB work files")
def command(model_path, arch, pairs, ijb, data, split, batch_size, device, out) -> None:
    """Evaluate MODEL (a checkpoint, a plain arcface_torch state_dict with --model, or an ONNX file)."""
    from edgekd.atomic import file_sha256, write_json
    from edgekd.data import create_dataset, create_pairs
    from edgekd.errors import EdgekdError
    from edgekd.eval.embed import evaluate_pairs
    from edgekd.eval.report import REPORT_FARS, classify_bundle
    from edgekd.train.loop import resolve_device

    if not (pairs or ijb or data):
        pairs = ("synthetic",)
    forward, mean, std, input_size, bundle = _open_model(model_path, arch, device)
    out = Path(out)
    report: dict = {"model": str(model_path)}
    curves = {}
    dev = resolve_device(device)
    for spec in pairs:
        pair_set = create_pairs(spec, image_size=input_size[1])
        result = evaluate_pairs(forward, pair_set, mean=mean, std=std, batch_size=batch_size, device=dev)
        tars = "  ".join(
            f"TAR@FAR={far:g}: {result['tar_at_far'][far]:.4f}"
            for far in result["tar_at_far"]
            if far in REPORT_FARS or far == 1e-1
        )
        click.echo(f"{spec}: accuracy {result['accuracy']:.4f} ± {result['std']:.4f}  {tars}")
        report[spec] = {
            "accuracy": result["accuracy"],
            "std": result["std"],
            "tar_at_far": {str(k): v for k, v in result["tar_at_far"].items()},
        }
        curves[spec] = (result["fpr"], result["tpr"])
    if ijb:
        from edgekd.eval.ijb import evaluate_ijb

        result = evaluate_ijb(
            forward,
            ijb,
            out / "ijb",
            batch_size=batch_size,
            mean=mean,
            std=std,
            image_size=input_size[1],
            model_key=file_sha256(model_path),
            device=dev,
        )
        click.echo(
            "IJB: " + "  ".join(f"TAR@FAR={float(far):g}: {tar:.4f}" for far, tar in result["tar_at_far"].items())
        )
        report["ijb"] = {"tar_at_far": {str(k): v for k, v in result["tar_at_far"].items()}}
    if data:
        if bundle is None or bundle.head is None:
            raise EdgekdError("classification accuracy needs an edgekd checkpoint with a head, not an exported model")
        result = classify_bundle(bundle, create_dataset(data, split=split), device=device, batch_size=batch_size)
        click.echo(f"{data} [{split}]: top-1 {result['top1']:.4f}")
        report[f"{data}:{split}"] = result
    if curves:
        from edgekd.eval.roc_plot import plot_roc

        plot_roc(curves, out / "roc.png")
        report["roc_plot"] = str(out / "roc.png")
    write_json(out / "eval.json", report)
    click.echo(f"report: {out / 'eval.json'}")
