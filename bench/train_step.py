"""CPU/GPU training throughput of the distillation step: eager vs torch.compile, live teacher vs teacher cache vs the
student alone, and heads of many classes (default 100k and 1M), where the loss is most of the step.

Runs the real training loop (``edgekd.train.loop.fit``: data in the main process, normalize + flip, teacher
embedding, loss, backward, SGD) for a few steps per setting on built-in synthetic identities and reports the median
images/s over the steps after warm-up (compile time excluded; it is in ``wall_s``). The synthetic images are all
rendered before the first setting, so no timed step pays for rendering. With 16 identities the head costs nothing;
the many-class settings keep the same images and spread their labels over C classes (``ManyClasses``), so the
student head, its optimizer state and the frozen teacher head are C × D and the shared-head loss sweeps all C.

    python -m bench.train_step --model mbf --teacher r18 --batch-size 64 --image-size 112 --steps 8 --warmup 3
    python -m bench.train_step --batch-size 8 --image-size 32 --steps 3 --warmup 1 --classes 1000   # toy check
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from edgekd.bundle import Bundle
from edgekd.data.synthetic import SyntheticIdentities
from edgekd.distill.pipeline import build_trainee
from edgekd.heads import create_head
from edgekd.losses import LossWeights
from edgekd.train.config import TrainConfig
from edgekd.train.loop import fit
from edgekd.train.teacher import Teacher

DISTILL = LossWeights(ce=1.0, th_ce=1.0, l2e=1.0)  # TH-KD through the frozen teacher head, plus l2e
STUDENT_ONLY = LossWeights(ce=1.0)


@dataclass(frozen=True)
class Setting:
    """One row: compiled or eager, where the teacher embedding comes from, and the number of classes."""

    compile: bool
    teacher: str  # "live" (frozen forward pass each step), "cache" (memory-mapped embeddings) or "none"
    classes: int | None = None  # None: the synthetic identities' own count

    @property
    def name(self) -> str:
        teacher = {"live": "live teacher", "cache": "teacher cache", "none": "student only"}[self.teacher]
        classes = "" if self.classes is None else f", C={self.classes:,}"
        return f"{'compiled' if self.compile else 'eager'}, {teacher}{classes}"


def default_settings(compile_modes: tuple[bool, ...], classes: tuple[int, ...]) -> list[Setting]:
    """Live teacher, teacher cache and student alone per compile mode; then, compiled with the teacher cache (where
    the teacher costs nothing and the loss the most), one setting per class count."""
    rows = [Setting(c, t) for c in compile_modes for t in ("live", "cache", "none")]
    return rows + [Setting(True in compile_modes, "cache", n) for n in classes]


class ManyClasses(Dataset):
    """A dataset whose ``num_identities`` labels are spread over ``num_classes`` (label l → l · ⌊C / n⌋)."""

    def __init__(self, dataset, num_classes: int) -> None:
        if num_classes < dataset.num_classes:
            raise ValueError(f"{num_classes} classes is fewer than the dataset's {dataset.num_classes}")
        self.dataset, self.num_classes = dataset, num_classes
        self.stride = num_classes // dataset.num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, int(label) * self.stride

    @property
    def fingerprint(self) -> str:
        return f"{self.dataset.fingerprint}-C{self.num_classes}"

    @property
    def image_size(self) -> int:
        return self.dataset.image_size

    @property
    def channels(self) -> int:
        return self.dataset.channels


def frozen_teacher(setting: Setting, teacher: Bundle, data, cfg: TrainConfig, work: Path) -> Teacher | None:
    """The teacher side of a setting: its frozen backbone or embedding cache, and a frozen head over data's classes."""
    if setting.teacher == "none":
        return None
    head = teacher.head
    if head.num_classes != data.num_classes:
        # A many-class setting: a fresh head of that width (its values do not matter for throughput).
        head = create_head(cfg.head, teacher.backbone.embed_dim, data.num_classes, s=cfg.scale, m=cfg.margin)
    head = head.freeze()
    if setting.teacher == "live":
        return Teacher(teacher.backbone, head)
    return Teacher(teacher.backbone, head).with_cache(data, work / "cache", torch.device(cfg.device))


def measure(setting: Setting, base: TrainConfig, dataset, teacher: Bundle, warmup: int, work: Path) -> dict:
    """One setting's row: median images/s of the steps after ``warmup`` and the wall time including compilation."""
    data = dataset if setting.classes is None else ManyClasses(dataset, setting.classes)
    cfg = replace(base, compile=setting.compile)
    row = {"setting": setting.name, "compile": setting.compile, "teacher": setting.teacher,
           "classes": data.num_classes, "batch_size": cfg.batch_size}  # fmt: skip
    torch._dynamo.reset()
    started = time.perf_counter()
    run = Path(tempfile.mkdtemp(dir=work))
    try:
        student = build_trainee(cfg, data, embed_dim=teacher.backbone.embed_dim)
        frozen = frozen_teacher(setting, teacher, data, cfg, work)
        fit(student, cfg, DISTILL if frozen is not None else STUDENT_ONLY, data, run, teacher=frozen)
        rates = [json.loads(line)["images_per_s"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    except Exception as exc:  # one failing setting (out of memory at 1M classes, say) must not end the others
        text = str(exc).strip()
        return dict(row, note=f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}")
    finally:
        shutil.rmtree(run, ignore_errors=True)  # the final checkpoint of a 1M-class head is gigabytes
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    timed = rates[warmup:] or rates[-1:]
    ips = statistics.median(timed)
    return dict(row, images_per_s=round(ips, 1), ms_per_step=round(1e3 * cfg.batch_size / ips, 3),
                steps_timed=len(timed), wall_s=round(time.perf_counter() - started, 1))  # fmt: skip


def synthetic_faces(batch_size: int, image_size: int, identities: int) -> SyntheticIdentities:
    """Enough synthetic identities for a few batches, every image rendered now (not during a timed step)."""
    dataset = SyntheticIdentities(
        identities=identities, images_per_identity=max(1, batch_size // 4), image_size=image_size, seed=0
    )
    dataset.tensor()
    return dataset


def base_config(model: str, batch_size: int, steps: int, device: str) -> TrainConfig:
    return TrainConfig(model=model, batch_size=batch_size, steps=steps, log_every=1, checkpoint_every=10**9,
                       device=device, warmup_steps=0, lr=0.01)  # fmt: skip


def build_teacher(name: str, base: TrainConfig, dataset) -> Bundle:
    teacher = build_trainee(replace(base, model=name, seed=1), dataset)
    teacher.backbone.eval()
    return teacher


def run_settings(settings, base: TrainConfig, dataset, teacher: Bundle, warmup: int, on_row=print) -> list[dict]:
    """Measure every setting in order; ``on_row`` sees each row as soon as it exists."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in settings:
            rows.append(measure(setting, base, dataset, teacher, warmup, Path(tmp)))
            on_row(rows[-1])
    return rows


def table_lines(rows: list[dict]) -> list[str]:
    """Markdown rows; a many-class row's ms/step minus the identities' row of the same kind is what the head adds."""
    lines = [
        "| setting | classes | images/s | ms/step | wall s (incl. compile) | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ips = f"{r['images_per_s']:.1f}" if "images_per_s" in r else ""
        ms = f"{r['ms_per_step']:.2f}" if "ms_per_step" in r else ""
        lines.append(
            f"| {r['setting']} | {r['classes']:,} | {ips} | {ms} | {r.get('wall_s', '')} | {r.get('note', '')} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mbf")
    parser.add_argument("--teacher", default="r18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--identities", type=int, default=16, help="synthetic identities (the small head's C)")
    parser.add_argument("--classes", type=int, nargs="*", default=[100_000, 1_000_000], help="many-class rows")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dataset = synthetic_faces(args.batch_size, args.image_size, args.identities)
    base = base_config(args.model, args.batch_size, args.steps, args.device)
    teacher = build_teacher(args.teacher, base, dataset)
    settings = default_settings(tuple(m == "compiled" for m in args.modes), tuple(args.classes))
    rows = run_settings(
        settings, base, dataset, teacher, args.warmup, on_row=lambda r: print(json.dumps(r), flush=True)
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(
        f"\n{args.model} student, {args.teacher} teacher, B={args.batch_size}, {args.image_size}x{args.image_size}, "
        f"device={args.device}, threads={torch.get_num_threads()}, torch {torch.__version__}"
    )
    print("\n".join(table_lines(rows)))


if __name__ == "__main__":
    main()
