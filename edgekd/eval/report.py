"""Evaluate bundles (verification pairs or classification top-1) and print comparison tables."""

from __future__ import annotations

import torch

from edgekd.bundle import Bundle
from edgekd.data.transforms import normalize
from edgekd.eval.embed import evaluate_pairs
from edgekd.eval.metrics import combined_prediction, far_rule_reason
from edgekd.utils.device import resolve_device

# FARs in comparison tables, each shown only where the pair set resolves it (``metrics.resolvable_fars``: 6,000
# impostor pairs resolve 1e-3, a few hundred only 1e-1); IJB-scale protocols print the full sweep.
REPORT_FARS = (1e-3, 1e-2, 1e-1)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def verify_bundle(bundle: Bundle, pairs, device: str = "auto", batch_size: int = 128) -> dict:
    """10-fold accuracy, TAR@FAR and the ROC curve ``roc: (fpr, tpr)`` of the flip-summed embeddings on ``pairs``;
    ``accuracy_ci`` and ``tar_ci`` (keyed by the FARs the pair set resolves) are 95 % intervals."""
    dev = resolve_device(device)
    backbone = bundle.backbone.to(dev).eval()
    result = evaluate_pairs(
        backbone, pairs, mean=bundle.cfg.mean, std=bundle.cfg.std, batch_size=batch_size, device=dev
    )
    return {
        "accuracy": result["accuracy"],
        "accuracy_std": result["std"],
        "accuracy_ci": result["accuracy_ci"],
        "tar_at_far": {str(far): result["tar_at_far"][far] for far in result["tar_at_far"]},
        "tar_ci": {str(far): ci for far, ci in result["tar_ci"].items()},  # the resolvable FARs only
        "impostor_pairs": result["impostors"],
        "roc": (result["fpr"], result["tpr"]),
    }


@torch.no_grad()
def classify_bundle(
    bundle: Bundle, dataset, device: str = "auto", batch_size: int = 256, shared_head=None, alpha: float = 0.0
) -> dict:
    """Top-1 accuracy of backbone + own head on ``dataset``; with ``shared_head`` (the frozen teacher head TH-KD
    trained the student through) also of the paper's combined prediction p′ = (1 − α)·p_s + α·p_th, as ``top1_p′``.
    """
    if bundle.head is None:
        raise ValueError("classification accuracy needs a checkpoint with a head")
    dev = resolve_device(device)
    backbone, head = bundle.backbone.to(dev).eval(), bundle.head.to(dev).eval()
    shared = shared_head.to(dev).eval() if shared_head is not None else None
    correct = correct_combined = 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    for images, labels in loader:
        z = backbone(normalize(images.to(dev), bundle.cfg.mean, bundle.cfg.std))
        logits = head(z)
        correct += (logits.argmax(1).cpu() == labels).sum().item()
        if shared is not None:
            p = combined_prediction(logits.cpu(), shared(z).cpu(), alpha)
            correct_combined += (torch.from_numpy(p).argmax(1) == labels).sum().item()
    result = {"top1": correct / len(dataset)}
    if shared is not None:
        result["top1_p′"] = correct_combined / len(dataset)
    return result


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain aligned text table; ``columns`` are (key, header) pairs, floats shown with 4 decimals."""

    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    body = [[cell(row.get(key, "")) for key, _ in columns] for row in rows]
    widths = [max(len(header), *(len(r[i]) for r in body)) for i, (_, header) in enumerate(columns)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line([h for _, h in columns]), line(["-" * w for w in widths]), *map(line, body)])


def value_ci(value: float, ci=None) -> str:
    """A fraction and its interval in percent, the one format of every table and line: ``88.80 [87.1, 90.2]``."""
    return f"{100 * value:.2f}" if ci is None else f"{100 * value:.2f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _tar_values(tar_at_far: dict[float, float], tar_ci: dict | None = None) -> str:
    """``TAR@FAR (%) 1e-03: 50.00  1e-02: 72.00`` from fractions; the unit is stated once, before the values."""
    ci = tar_ci or {}
    return "TAR@FAR (%) " + "  ".join(f"{far:.0e}: {value_ci(tar, ci.get(far))}" for far, tar in tar_at_far.items())


def format_tar_line(name: str, tar_at_far: dict[float, float]) -> str:
    """``name: TAR@FAR (%) 1e-05: 91.20  1e-04: 94.10`` (IJB-style results)."""
    return f"{name}: {_tar_values(tar_at_far)}"


def format_verification(
    name: str,
    accuracy: float,
    accuracy_ci: tuple[float, float],
    tar_at_far: dict[float, float],
    tar_ci: dict[float, tuple[float, float]],
    impostors: int | None = None,
) -> str:
    """One verification line in percent with 95 % intervals:
    ``name: accuracy (%) 88.80 [87.1, 90.2]  |  TAR@FAR (%) 1e-01: 50.00 [44.2, 55.8]``.

    ``tar_at_far`` holds the resolvable FARs only; when it is empty and ``impostors`` is given the line says so.
    """
    line = f"{name}: accuracy (%) {value_ci(accuracy, accuracy_ci)}"
    if tar_at_far:
        return f"{line}  |  {_tar_values(tar_at_far, tar_ci)}"
    if impostors is not None:
        return f"{line}  |  TAR@FAR (%) none resolvable with {impostors} impostor pairs ({far_rule_reason(impostors)})"
    return line
