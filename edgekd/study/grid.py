"""The study grid as data: datasets × method rows (× weight variants) × seeds, in three profiles.

A **row** is one line of the results table: the teacher itself, or a method under one preset (``th-kd/code``). A row
has one or more **variants** (weight overrides on top of its preset); the ``full`` profile sweeps one knob per KD
row over three values. Variants are trained on the first seed only and compared on the validation split; the best
one is then trained on every other seed and each row's chosen cell is evaluated once on the test split.

Profiles (epochs are over the training split; estimates from ``estimate_seconds``):

========  =====  =========================================================================  ==================
profile   seeds  what                                                                       estimate (1 thread)
========  =====  =========================================================================  ==================
``tiny``  1      test suite: tiny models, a few steps, two-variant sweeps of kd and sh-kd    seconds
``quick`` 1      the full profile's models, short schedules, presets only (no sweep)         fmnist 4.9 + synthetic
                                                                                            3.8 = 8.7 min
``full``  3      Fashion-MNIST (55k training images): ResNet-18 teacher 4 epochs,            fmnist 82 + synthetic
                 cnn_tiny student 4 epochs; synthetic (200 identities × 20 images, 32 px):  92 = 174 min
                 r_small teacher 6 epochs, mbf student 4 epochs; three-value sweeps of
                 every KD row on seed 0
========  =====  =========================================================================  ==================

How the estimates are made: per-image costs of a training step and of a forward pass (``COSTS``), measured with
``time.process_time`` at one torch thread on the 2-core development machine (AMD EPYC, torch 2.14.1, eager mode;
the machine was shared, so wall-clock rates were about 1.5× slower than these CPU-time rates), multiplied by the
images each cell processes: teacher and SH-KD stage-I1 training, their embedding caches (every training image and
its flip, once per teacher), every student training (seed 0: each variant; later seeds: one per row), and the
evaluations (flip-summed for faces). In the full profile the students take about two thirds of the time, the
teachers (with their caches) one third.
Two threads run the convolutions faster, so a run on both cores comes in under the one-thread estimate. The report
records the measured time: the full profile took 1 h 55 min on both cores of that machine and ``quick`` 5 min 53 s
(docs/results/study).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from edgekd.data import parse_synthetic_spec
from edgekd.errors import EdgekdError

__all__ = ["Variant", "Row", "Trainee", "DatasetPlan", "Profile", "PROFILES", "build_profile", "estimate_seconds"]


@dataclass(frozen=True)
class Variant:
    """Term-weight overrides on top of a row's preset; ``label`` names it in folders and tables."""

    label: str
    overrides: dict[str, float] = field(default_factory=dict)


PRESET = Variant("preset")


@dataclass(frozen=True)
class Row:
    """One row of the results table: ``method`` is ``teacher`` or a name in ``edgekd.distill.METHODS``."""

    key: str
    method: str
    preset: str | None = None
    variants: tuple[Variant, ...] = (PRESET,)

    @property
    def is_teacher(self) -> bool:
        return self.method == "teacher"


@dataclass(frozen=True)
class Trainee:
    """Architecture and schedule of the teacher or of the students."""

    model: str
    epochs: float
    lr: float
    batch_size: int
    model_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetPlan:
    """One dataset of the study: its data, models, schedules, rows and evaluation sets.

    Classification (``head="linear"``) reports top-1 on the ``test`` split and selects on ``val``. Face heads report
    verification on held-out identities (``verify_test`` = identities × images, seed of the data) and select on
    other held-out identities (``verify_val``, drawn with the data seed + 1).
    """

    name: str
    data: str
    head: str
    teacher: Trainee
    student: Trainee
    rows: tuple[Row, ...]
    image_size: int | None = None
    scale: float = 64.0
    margin: float | None = None
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    eval_limit: int | None = None
    verify_test: tuple[int, int] = (200, 10)
    verify_val: tuple[int, int] = (100, 10)

    @property
    def face(self) -> bool:
        return self.head != "linear"

    @property
    def selection_metric(self) -> str:
        """The validation number variants are compared by (higher is better)."""
        return "tar@0.001" if self.face else "top1"


@dataclass(frozen=True)
class Profile:
    name: str
    seeds: int
    datasets: tuple[DatasetPlan, ...]
    compile: bool = False  # torch.compile costs 20-120 s per cell on a CPU and bought no speed there
    checkpoint_every: int = 100
    log_every: int = 10


def _sweep(knob: str, values: tuple[float, ...]) -> tuple[Variant, ...]:
    return tuple(Variant(f"{knob}={v:g}", {knob: v}) for v in values)


def _alpha_sweep(values: tuple[float, ...]) -> tuple[Variant, ...]:
    # The paper's convex split: (1 - α)·(ce, kd) on the student head, α·(th_ce, th_kd) through the teacher head.
    return tuple(Variant(f"alpha={a:g}", {"ce": 1 - a, "kd": 1 - a, "th_ce": a, "th_kd": a}) for a in values)


def _rows(face: bool, sweep: bool) -> tuple[Row, ...]:
    """teacher, vanilla, kd, l2e, th-kd (code, paper; face on face data), sh-kd (code; face on face data)."""

    def variants(full: tuple[Variant, ...]) -> tuple[Variant, ...]:
        return full if sweep else (PRESET,)

    rows = [
        Row("teacher", "teacher"),
        Row("vanilla", "vanilla"),
        Row("kd", "kd", None, variants(_sweep("T", (2.0, 4.0, 8.0)))),
        Row("l2e", "l2e", None, variants(_sweep("l2e", (1.0, 10.0, 100.0)))),
        Row("th-kd/code", "th-kd", "code", variants(_sweep("th_kd", (0.02, 0.2, 1.0)))),
        Row("th-kd/paper", "th-kd", "paper", variants(_alpha_sweep((0.25, 0.5, 0.75)))),
    ]
    if face:
        rows.append(Row("th-kd/face", "th-kd", "face", variants(_sweep("th_ce", (0.5, 1.0, 2.0)))))
        rows.append(Row("sh-kd/face", "sh-kd", "face", variants(_sweep("th_ce", (0.5, 1.0, 2.0)))))
    # On faces both SH-KD forms run: the face preset (th_ce, no KL) and the code form (kd + th_kd + l2e).
    rows.append(Row("sh-kd/code", "sh-kd", "code", variants(_sweep("th_kd", (0.02, 0.2, 1.0)))))
    return tuple(rows)


# The built-in demo's face settings (edgekd/cli/distill.py DEMO): 32×32 synthetic faces, ArcFace s = 16, m = 0.3.
_FACE = dict(head="arcface", scale=16.0, margin=0.3, image_size=32, warmup_steps=20)


def _full() -> Profile:
    # A teacher must beat the student trained alone, or distillation is not being tested: with 2 teacher and 8 student
    # epochs the 8k-parameter cnn_tiny (val 90.7 %) beat the 28-px ResNet-18 (val 90.1 %), so the teacher got two
    # more epochs and the student four fewer (the total cost stays about the same).
    fmnist = DatasetPlan(
        name="fmnist",
        data="fmnist",
        head="linear",
        teacher=Trainee("timm/resnet18", epochs=4.0, lr=0.1, batch_size=128),
        student=Trainee("cnn_tiny", epochs=4.0, lr=0.1, batch_size=128),
        rows=_rows(face=False, sweep=True),
        warmup_steps=100,
    )
    synthetic = DatasetPlan(
        name="synthetic",
        data="synthetic:identities=200,images_per_identity=20,image_size=32",
        teacher=Trainee("r_small", epochs=6.0, lr=0.1, batch_size=64),
        student=Trainee("mbf", epochs=4.0, lr=0.1, batch_size=64),
        rows=_rows(face=True, sweep=True),
        verify_test=(200, 10),
        verify_val=(100, 10),
        **_FACE,
    )
    return Profile("full", seeds=3, datasets=(fmnist, synthetic))


def _quick() -> Profile:
    full = _full()
    fmnist, synthetic = full.datasets
    fmnist = replace(
        fmnist,
        teacher=replace(fmnist.teacher, epochs=0.25),
        student=replace(fmnist.student, epochs=1.0),
        rows=_rows(face=False, sweep=False),
        warmup_steps=20,
    )
    synthetic = replace(
        synthetic,
        data="synthetic:identities=100,images_per_identity=20,image_size=32",
        teacher=replace(synthetic.teacher, epochs=3.0),
        student=replace(synthetic.student, epochs=1.0),
        rows=_rows(face=True, sweep=False),
        verify_test=(100, 10),
        verify_val=(50, 10),
        warmup_steps=5,
    )
    return replace(full, name="quick", seeds=1, datasets=(fmnist, synthetic), checkpoint_every=50, log_every=5)


def _tiny() -> Profile:
    """Tiny models and a few steps for the test suite; one two-variant sweep (kd's T) and a two-variant sh-kd."""

    def rows(face: bool) -> tuple[Row, ...]:
        out = []
        for row in _rows(face, sweep=False):
            if row.method == "kd":
                row = replace(row, variants=_sweep("T", (2.0, 4.0)))
            if row.method == "sh-kd":
                knob = "th_ce" if row.preset == "face" else "th_kd"
                row = replace(row, variants=_sweep(knob, (0.5, 1.0)))
            out.append(row)
        return tuple(out)

    fmnist = DatasetPlan(
        name="fmnist",
        data="fmnist",
        head="linear",
        teacher=Trainee("cnn_small", epochs=2.0, lr=0.05, batch_size=32),
        student=Trainee("cnn_tiny", epochs=2.0, lr=0.05, batch_size=32),
        rows=rows(face=False),
        eval_limit=64,
    )
    synthetic = DatasetPlan(
        name="synthetic",
        data="synthetic:identities=8,images_per_identity=8,image_size=32",
        teacher=Trainee("r_tiny", epochs=2.0, lr=0.05, batch_size=16),
        student=Trainee("mbf_tiny", epochs=2.0, lr=0.05, batch_size=16),
        rows=rows(face=True),
        verify_test=(6, 4),
        verify_val=(6, 4),
        **{**_FACE, "warmup_steps": 0},
    )
    return Profile("tiny", seeds=1, datasets=(fmnist, synthetic), checkpoint_every=4, log_every=2)


PROFILES = {"tiny": _tiny, "quick": _quick, "full": _full}


def build_profile(
    name: str, seeds: int | None = None, datasets: list[str] | None = None, fmnist_root: str | None = None
) -> Profile:
    """A profile, optionally with ``seeds`` seeds, only ``datasets``, and Fashion-MNIST read from ``fmnist_root``."""
    if name not in PROFILES:
        raise EdgekdError(f"unknown study profile {name!r}; choose one of {', '.join(PROFILES)}")
    profile = PROFILES[name]()
    if seeds is not None:
        if seeds < 1:
            raise EdgekdError(f"--seeds {seeds} must be at least 1")
        profile = replace(profile, seeds=seeds)
    plans = profile.datasets
    if datasets is not None:
        known = [d.name for d in plans]
        unknown = [d for d in datasets if d not in known]
        if unknown or not datasets:
            raise EdgekdError(f"unknown dataset(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}")
        plans = tuple(d for d in plans if d.name in datasets)
    if fmnist_root:
        plans = tuple(replace(d, data=f"fmnist:{fmnist_root}") if d.name == "fmnist" else d for d in plans)
    return replace(profile, datasets=plans)


# ms of one-thread CPU time per image: (training step, forward pass), at (model, input side, batch size) as the
# profiles use them; measured with time.process_time, eager mode, torch 2.14.1, on the 2-core development machine.
COSTS: dict[tuple[str, int], tuple[float, float]] = {
    ("timm/resnet18", 28): (2.59, 0.67),
    ("timm/resnet10t", 28): (1.75, 0.50),
    ("cnn_small", 28): (2.63, 0.79),
    ("cnn_tiny", 28): (0.16, 0.08),
    ("r_small", 32): (5.45, 1.24),
    ("mbf", 32): (7.26, 1.37),
    ("r_tiny", 32): (1.50, 0.31),
    ("mbf_tiny", 32): (0.84, 0.11),
}
_FMNIST_TRAIN, _FMNIST_VAL, _FMNIST_TEST = 55_000, 5_000, 10_000


def _train_images(plan: DatasetPlan) -> int:
    if plan.face:
        opts = parse_synthetic_spec(plan.data)
        return opts.get("identities", 1000) * opts.get("images_per_identity", 20)
    return _FMNIST_TRAIN


def estimate_seconds(profile: Profile) -> dict[str, float | None]:
    """Estimated one-thread CPU seconds per dataset (None where a model's cost was not measured); see module doc."""
    out: dict[str, float | None] = {}
    for plan in profile.datasets:
        side = plan.image_size or 28
        t_cost, s_cost = COSTS.get((plan.teacher.model, side)), COSTS.get((plan.student.model, side))
        if t_cost is None or s_cost is None:
            out[plan.name] = None
            continue
        n = _train_images(plan)
        students = [r for r in plan.rows if not r.is_teacher]
        distilled = [r for r in students if r.method != "vanilla"]
        has_sh = any(r.method == "sh-kd" for r in students)
        teachers = 2 if has_sh else 1  # the SH-KD student-aware teacher (stage I1) trains like the teacher
        per_seed_teacher = teachers * (n * plan.teacher.epochs * t_cost[0] + (2 * n * t_cost[1] if distilled else 0))
        student_run = n * plan.student.epochs * s_cost[0]
        first = sum(len(r.variants) for r in students)
        trainings = first + (profile.seeds - 1) * len(students)
        if plan.face:  # flip-summed embeddings of the held-out images
            val = 2 * plan.verify_val[0] * plan.verify_val[1]
            test = 2 * plan.verify_test[0] * plan.verify_test[1]
        else:
            val = min(_FMNIST_VAL, plan.eval_limit or _FMNIST_VAL)
            test = min(_FMNIST_TEST, plan.eval_limit or _FMNIST_TEST)
        evals = trainings * val * s_cost[1] + profile.seeds * (
            len(students) * test * s_cost[1] + (val + test + (test if has_sh else 0)) * t_cost[1]
        )
        total_ms = profile.seeds * per_seed_teacher + trainings * student_run + evals
        out[plan.name] = total_ms / 1000.0
    return out
