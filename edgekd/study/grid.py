"""The study as data: the rows, their loss weights from a handful of hyper-parameters, and the profiles.

Every row is KD-family distillation at **one** temperature T and **one** KD weight, and a row differs from its
baseline only by its own term(s) (issue 14, item 3):

===================  ===========================================================  ===========================
row                  loss (ce, kd, th_ce, th_kd, l2e; T_th = T)                    baseline it adds to
===================  ===========================================================  ===========================
``vanilla``          ce                                                           —
``kd``               ce + k·kd                                                    vanilla
``kd+th``            ce + k·kd + λ·th_kd  (the official code's ``kdth``)          kd
``kd-matched``       ce + (k + λ)·kd: KD at kd+th's total distillation weight     kd (study v3's control)
``th-kd/paper``      (1−α)·ce + α·th_ce + k·((1−α)·kd + α·th_kd)  (paper, α=0: kd)  kd
``kd+l2e``           ce + k·kd + β·l2e                                            kd
``kd+l2e+th``        ce + k·kd + β·l2e + λ·th_kd  (the official ``kdeth``)         kd+l2e
``sh-kd/th``         kd+l2e+th's weights, from the student-aware teacher; the      kd+l2e+th (teacher only)
                     student head starts at θ_s and th_kd reads θ_s (SPEC's I2)
``sh-kd/official``   kd+l2e's weights, from the student-aware teacher; a fresh     kd+l2e (teacher only)
                     trainable head (the official code's I2)
===================  ===========================================================  ===========================

``th-kd/paper`` is reported twice: its student head (the model the official code reports) and the paper's combined
prediction p′ = (1−α)·p_s + α·p_th, p_th the frozen teacher head read on the student embedding.

Hyper-parameters (k is fixed; the rest are chosen on the validation split, seed 0, in this order): T from ``kd``
over ``T``; then, at that T, λ from ``kd+th`` over ``th_kd``, α from ``th-kd/paper`` over ``alpha`` and β from
``kd+l2e`` over ``l2e``. ``kd+l2e+th`` and both SH-KD rows reuse them (no sweep of their own), so every row's
weights are its baseline's plus its own term.

Every student is built at the teacher's embedding width (``embed_dim`` = D_t), vanilla and KD included, so all
rows have the same architecture, parameter count and initialization per seed (the same seeds and data order for
every row). One teacher (seed 0) teaches every seed; SH-KD trains one student-aware teacher per seed (its head is
that seed's vanilla student's θ_s), shared by both SH-KD forms.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from edgekd.errors import EdgekdError
from edgekd.losses import LossWeights

__all__ = [
    "ROWS",
    "SWEPT",
    "Trainee",
    "Sweeps",
    "Gates",
    "Profile",
    "PROFILES",
    "build_profile",
    "row_weights",
    "row_params",
    "paper_alpha",
    "hp_label",
    "cell_folder",
    "estimate_seconds",
    "FMNIST_TEACHER",
    "FMNIST_STUDENT",
]

ROWS = ("vanilla", "kd", "kd+th", "th-kd/paper", "kd+l2e", "kd+l2e+th", "sh-kd/th", "sh-kd/official")
# The hyper-parameter each swept row chooses on validation (seed 0), in the order they are chosen.
SWEPT = {"kd": "T", "kd+th": "th_kd", "th-kd/paper": "alpha", "kd+l2e": "l2e"}
# The hyper-parameters each row's weights depend on (its cell folder is named by their values).
_ROW_PARAMS = {
    "vanilla": (),
    "kd": ("T",),
    "kd+th": ("T", "th_kd"),
    "th-kd/paper": ("T", "alpha"),
    "kd+l2e": ("T", "l2e"),
    "kd+l2e+th": ("T", "l2e", "th_kd"),
    "sh-kd/th": ("T", "l2e", "th_kd"),
    "sh-kd/official": ("T", "l2e"),
    "kd-matched": ("T", "th_kd"),
}


def row_params(row: str) -> tuple[str, ...]:
    """The hyper-parameters ``row``'s weights read."""
    return _ROW_PARAMS[row]


def hp_label(hp: dict[str, float]) -> str:
    """``T=4,th_kd=1``: a cell's folder name from its hyper-parameters (``base`` for none)."""
    return ",".join(f"{k}={v:g}" for k, v in hp.items()) or "base"


def cell_folder(row: str, seed: int, hp: dict[str, float]) -> Path:
    """Where a cell lives under the study folder: ``teacher``, ``seed<k>/sh-teacher``, ``seed<k>/vanilla-long`` (the
    vanilla student at twice its epochs) or ``seed<k>/<row>/<label>``;
    a student row's label names the hyper-parameters its weights read (``hp`` may hold more)."""
    if row == "teacher":
        return Path("teacher")
    if row == "sh-teacher":
        return Path(f"seed{seed}") / "sh-teacher"
    if row == "vanilla-long":
        return Path(f"seed{seed}") / "vanilla-long"
    return Path(f"seed{seed}") / row.replace("/", "_") / hp_label({k: hp[k] for k in row_params(row)})


def row_weights(row: str, hp: dict[str, float], kd: float) -> LossWeights:
    """The loss weights of ``row`` under hyper-parameters ``hp`` (``T``, ``th_kd``, ``alpha``, ``l2e``) and KD
    weight ``kd``."""
    if row not in _ROW_PARAMS:
        raise EdgekdError(f"unknown study row {row!r}; choose one of {', '.join(ROWS)}")
    if row == "vanilla":
        return LossWeights(ce=1.0)
    T = hp["T"]
    if row == "th-kd/paper":
        a = hp["alpha"]
        return LossWeights(ce=1.0 - a, th_ce=a, kd=kd * (1.0 - a), th_kd=kd * a, T=T, T_th=T)
    if row == "kd-matched":  # KD alone at kd+th's total distillation weight k + λ (study v3's control)
        return LossWeights(ce=1.0, kd=kd + hp["th_kd"], T=T, T_th=T)
    return LossWeights(
        ce=1.0,
        kd=kd,
        th_kd=hp["th_kd"] if "th_kd" in _ROW_PARAMS[row] else 0.0,
        l2e=hp["l2e"] if "l2e" in _ROW_PARAMS[row] else 0.0,
        T=T,
        T_th=T,
    )


def paper_alpha(weights: dict) -> float | None:
    """α^TH of a paper-form weight set (th_ce / (ce + th_ce)); None when no CE term reads the teacher head."""
    if not weights.get("th_ce"):
        return None
    return weights["th_ce"] / (weights["ce"] + weights["th_ce"])


@dataclass(frozen=True)
class Trainee:
    """Architecture and schedule of the teacher or of the students (``epochs`` whole epochs, one checkpoint each);
    ``clip_grad`` is the gradient-norm clip (0: off; study v2 clipped every run at 5)."""

    model: str
    epochs: int
    lr: float
    batch_size: int
    model_kwargs: dict = field(default_factory=dict)
    clip_grad: float = 5.0


@dataclass(frozen=True)
class Sweeps:
    """The fixed KD weight and the validation grids of the swept hyper-parameters."""

    kd: float = 1.0
    T: tuple[float, ...] = (2.0, 4.0, 8.0)
    th_kd: tuple[float, ...] = (0.25, 1.0, 4.0)
    alpha: tuple[float, ...] = (0.25, 0.5, 0.75)
    l2e: tuple[float, ...] = (1.0, 10.0, 100.0)


@dataclass(frozen=True)
class Gates:
    """Checked on validation before any distilled student trains; a failed gate stops the study.

    - capacity: teacher backbone ≥ ``min_param_ratio`` × the student's (the student at teacher width), and teacher
      val top-1 ≥ the seed-0 vanilla student's + ``min_gap_points``;
    - convergence: the seed-0 vanilla student's validation top-1 gains less than ``flat_max_gain_points`` over
      the last ``flat_fraction`` of its epochs (its per-epoch curve is flat).
    """

    min_param_ratio: float = 8.0
    min_gap_points: float = 3.0
    flat_fraction: float = 0.2
    flat_max_gain_points: float = 0.3


@dataclass(frozen=True)
class Profile:
    """One way to run the study: data, models, schedules, seeds, grids and gates.

    ``train_images``: a fixed random subset of the Fashion-MNIST training split (the 5,000-image validation split
    is carved out first and never trained on); None trains on all 55,000. ``eval_limit``: evaluate on the first
    images of val and test only (the tiny profile). ``lr_power``: the learning rate decays as (1 − t)^power after
    the warm-up (2: arcface_torch's PolyScheduler). ``long_check``: also train the seed-0 vanilla student for twice
    its epochs and report what the longer schedule gains on validation (a second convergence check).
    ``head``/``scale``/``margin``: the class head of teacher and students; ``val_curves``: read each run's
    per-epoch validation curve (a forward pass over the validation split per epoch). ``pairs``: a verification
    pair spec (``synthetic:...``: held-out identities) every teacher and student is also scored on (``verify``).
    """

    name: str
    seeds: int
    teacher: Trainee
    student: Trainee
    train_images: int | None
    sweeps: Sweeps = Sweeps()
    gates: Gates = Gates()
    data: str = "fmnist"
    eval_limit: int | None = None
    warmup_steps: int = 50
    lr_power: float = 2.0
    weight_decay: float = 5e-4
    log_every: int = 20
    long_check: bool = True
    head: str = "linear"
    scale: float = 64.0
    margin: float | None = None
    val_curves: bool = True
    pairs: str | None = None

    def settings(self) -> dict:
        """What decides the numbers (not the seed count, which only adds cells)."""
        from dataclasses import asdict

        out = asdict(self)
        out.pop("seeds")
        out.pop("name")
        return out


# Models (edgekd/models/small_cnn.py) and schedules, sized by timed runs on the 2-core machine before the study
# (docs/results/study/FINDINGS.md, "Design"): the teacher is cnn_small with one conv per stage (32-64-128, 128-d,
# 111 k parameters with its head); the student is cnn_tiny at 4-8-16 with a stride-2 stem, at the teacher's 128-d
# width (5.1 k parameters, 22× fewer). Both train on the same 10,000 images; the student's 36 epochs (2,808 steps)
# leave its validation curve flat (seed 0 of a trial run: +0.24 points over the last 20 % of 30 epochs).
FMNIST_TEACHER = Trainee("cnn_small", epochs=16, lr=0.1, batch_size=128, model_kwargs={"depth": 1})
FMNIST_STUDENT = Trainee(
    "cnn_tiny", epochs=36, lr=0.05, batch_size=128, model_kwargs={"widths": (4, 8, 16), "stem_stride": 2}
)


def _full() -> Profile:
    return Profile("full", seeds=5, teacher=FMNIST_TEACHER, student=FMNIST_STUDENT, train_images=10_000)


def _quick() -> Profile:
    """The full profile's models on fewer images and epochs, one seed, small grids; the gates are reported but only
    the size gate stops it (a 4-epoch teacher is no evidence either way)."""
    return Profile(
        "quick",
        seeds=1,
        teacher=replace(FMNIST_TEACHER, epochs=4),
        student=replace(FMNIST_STUDENT, epochs=8),
        train_images=6_000,
        sweeps=Sweeps(T=(2.0, 4.0), th_kd=(1.0,), alpha=(0.5,), l2e=(10.0,)),
        gates=Gates(min_gap_points=-100.0, flat_max_gain_points=100.0),
        warmup_steps=20,
        log_every=10,
        long_check=False,
    )


def _tiny() -> Profile:
    """Seconds, for the test suite: tiny models, a few steps, two seeds, a two-value T grid."""
    return Profile(
        "tiny",
        seeds=2,
        teacher=Trainee("cnn_tiny", 2, 0.05, 32, {"widths": (8, 16, 32), "embed_dim": 32}),
        student=Trainee("cnn_tiny", 2, 0.05, 32, {"widths": (1, 1, 2), "embed_dim": 32, "stem_stride": 2}),
        train_images=96,
        sweeps=Sweeps(T=(2.0, 4.0), th_kd=(1.0,), alpha=(0.5,), l2e=(10.0,)),
        gates=Gates(min_param_ratio=8.0, min_gap_points=-100.0, flat_max_gain_points=100.0),
        eval_limit=64,
        warmup_steps=0,
        log_every=1,
    )


PROFILES = {"tiny": _tiny, "quick": _quick, "full": _full}


def build_profile(name: str, seeds: int | None = None, fmnist_root: str | None = None) -> Profile:
    """A profile, optionally with ``seeds`` seeds and Fashion-MNIST read from ``fmnist_root``."""
    if name not in PROFILES:
        raise EdgekdError(f"unknown study profile {name!r}; choose one of {', '.join(PROFILES)}")
    profile = PROFILES[name]()
    if seeds is not None:
        if seeds < 1:
            raise EdgekdError(f"--seeds {seeds} must be at least 1")
        profile = replace(profile, seeds=seeds)
    if fmnist_root:
        profile = replace(profile, data=f"fmnist:{fmnist_root}")
    return profile


# Wall-clock ms per image of the full profile's teacher and student on the 2-core development machine (Intel Xeon
# 2.8 GHz, eager mode, passive OpenMP waits), measured with the study's own training loop while other jobs kept the
# machine's load average at 3-5: (training step, forward pass). A KD step reads the teacher's cached embeddings, so
# a distilled student costs about what a vanilla one does.
COSTS: dict[str, tuple[float, float]] = {
    "teacher": (1.5, 0.5),
    "student": (0.2, 0.05),
}
_VAL, _TEST = 5_000, 10_000


def estimate_seconds(profile: Profile) -> float | None:
    """Estimated wall seconds of the whole profile on a quiet 2-core machine (None: models not measured)."""
    if profile.name == "tiny":
        return None
    t_train, t_fwd = COSTS["teacher"]
    s_train, s_fwd = COSTS["student"]
    n = profile.train_images or 55_000
    t, s = profile.teacher, profile.student
    teachers = 1 + profile.seeds  # the teacher, and one student-aware teacher per seed
    sw = profile.sweeps
    sweep_cells = len(sw.T) + len(sw.th_kd) + len(sw.alpha) + len(sw.l2e)
    students = 1 + sweep_cells + 3 + (profile.seeds - 1) * len(ROWS) + (2 if profile.long_check else 0)
    teacher_ms = teachers * (n * t.epochs * t_train + 2 * n * t_fwd + (t.epochs * _VAL + _TEST) * t_fwd)
    student_ms = students * (n * s.epochs * s_train + (s.epochs * _VAL + 2 * (_VAL + _TEST)) * s_fwd)
    return (teacher_ms + student_ms) / 1000.0
