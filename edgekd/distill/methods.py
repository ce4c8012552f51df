"""The KD methods as data: which loss terms each one turns on, with what weights (SPEC §3).

Every method trains through the same ``shared_head_loss``; a method is a set of term weights (a preset)
plus whether it needs a teacher. Presets:

- ``th-kd``/``paper``: the paper's convex split, (1−α)·ce + α·th_ce and (1−α)·kd + α·th_kd with α = 0.5.
- ``th-kd``/``code``: the official CIFAR code (Alibaba-MIIL/HeadSharingKD): ce 1, kd 1.5, th_kd 0.02, T 4.
- ``face``: CE through the shared head without KL terms (the form a KL over s = 64 margin logits, nearly
  one-hot, suggests); for SH-KD plus the embedding term.
- ``sh-kd``/``official``: SH-KD's final stage with the official README's fresh trainable student head and KD from
  the student-aware teacher. The official I2 adds CRD (``--distill crd``), which edgekd does not implement; this
  preset adds the L2E embedding term instead (the official face loss family, ``kde``), so it is not the official
  loss;
  the other SH-KD presets start the student's head from θ_s and distill through the teacher's head (θ_s, frozen).

- ``th-kd``/``kdth`` and ``sh-kd``/``kdeth``: the weights study v2 chose on validation (Fashion-MNIST): KD at T 2
  plus th_kd 4 at the same temperature (the official code's ``kdth``), and for SH-KD plus l2e 1 (``kdeth``).

Which preset each head family gets by default:

- classification: the paper's settings, TH-KD ``paper`` and SH-KD ``official``. Study v2 had made ``kdth``/``kdeth``
  the defaults; study v3 (docs/results/study/v3/FINDINGS.md, pre-registered) tested them on 30 fresh seeds and found
  KD+TH no better than KD at the same total distillation weight (−0.09 points, 95 % CI [−0.28, +0.09]) and 0.25
  points below KD (p 0.046, Holm 0.14), so, as its plan said, the defaults returned to the paper's.
- face (synthetic identities, ArcFace s = 16), from study v1 (docs/results/study/v1): TH-KD ``paper`` — the KL forms
  beat the CE-only ``face`` form (val TAR@1e-3: paper 34.2, code with th_kd 1 34.3, face with th_ce 2 33.7, face
  with th_ce 1 27.1), and among the tied KL forms the published one needs no extra weight; SH-KD ``face`` with
  th_ce 0.5, which beat the code form (27.3 vs 23.6). v1 had a trainable projection in front of the shared head
  (removed since) and mismatched temperatures; face heads at s = 64 were not studied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgekd.errors import EdgekdError
from edgekd.losses import LossWeights


@dataclass(frozen=True)
class MethodSpec:
    """A KD method: its presets (name → term weights), which preset each head family uses by default, and what a
    run of it does besides training one student with those weights.

    Attributes:
        needs_teacher: a teacher takes part (given, or the default one trained first).
        staged: the method trains its own teacher in stages (SH-KD's I0 → I1 → I2) instead of reading one up front.
        combined_prediction: the student is also scored through the teacher's head, the paper's p′ (TH-KD).
        fresh_head_presets: presets whose final student starts from a fresh head (SH-KD's official form).
    """

    name: str
    summary: str
    needs_teacher: bool
    presets: dict[str, dict[str, float]] = field(default_factory=dict)
    default_face: str = "default"
    default_classification: str = "default"
    fresh_head_presets: frozenset[str] = frozenset()
    staged: bool = False
    combined_prediction: bool = False

    @property
    def reads_teacher_file(self) -> bool:
        """Whether a run loads a teacher checkpoint before training its student (not SH-KD: its stages make one)."""
        return self.needs_teacher and not self.staged


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("vanilla", "student trained alone on the labels", False, {"default": {"ce": 1.0}}),
        MethodSpec(
            "kd", "Hinton KD: ce + T²·KL(teacher ‖ student head)", True, {"default": {"ce": 1.0, "kd": 1.0, "T": 4.0}}
        ),
        MethodSpec(
            "l2e",
            "ce + L2 distance of normalized embeddings (the paper's L2E baseline)",
            True,
            {"default": {"ce": 1.0, "l2e": 10.0}},
        ),
        MethodSpec(
            "th-kd",
            "teacher head, frozen, attached to the student embedding",
            True,
            {
                "paper": {"ce": 0.5, "th_ce": 0.5, "kd": 0.5, "th_kd": 0.5, "T": 4.0},
                "code": {"ce": 1.0, "kd": 1.5, "th_kd": 0.02, "T": 4.0},
                "face": {"ce": 1.0, "th_ce": 2.0, "T": 4.0},
                "kdth": {"ce": 1.0, "kd": 1.0, "th_kd": 4.0, "T": 2.0, "T_th": 2.0},
            },
            default_face="paper",
            default_classification="paper",
            combined_prediction=True,
        ),
        MethodSpec(
            "sh-kd",
            "student-aware teacher (stages I0, I1, I2), then the student: TH form (head from θ_s, terms through the "
            "teacher's head) or official form (fresh head, KD + l2e)",
            True,
            {
                "face": {"ce": 1.0, "th_ce": 0.5, "l2e": 10.0, "T": 4.0},
                "code": {"ce": 1.0, "kd": 1.5, "th_kd": 0.02, "l2e": 1.0, "T": 4.0},
                "official": {"ce": 1.0, "kd": 1.0, "l2e": 10.0, "T": 4.0},
                "kdeth": {"ce": 1.0, "kd": 1.0, "th_kd": 4.0, "l2e": 1.0, "T": 2.0, "T_th": 2.0},
            },
            default_face="face",
            default_classification="official",
            fresh_head_presets=frozenset({"official"}),
            staged=True,
        ),
    )
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise EdgekdError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def resolve_preset(name: str, preset: str | None, face: bool) -> str:
    """``preset``, or the default preset of method ``name`` for the head family; an unknown one is an error."""
    spec = get_method(name)
    preset = preset or (spec.default_face if face else spec.default_classification)
    if preset not in spec.presets:
        raise EdgekdError(f"method {name} has no preset {preset!r}; choose one of {', '.join(spec.presets)}")
    return preset


def method_weights(name: str, preset: str | None, face: bool, overrides: dict[str, float] | None = None) -> LossWeights:
    """The term weights of ``name`` under ``preset`` (default: by head family), with per-term ``overrides``."""
    values = {"ce": 0.0, **get_method(name).presets[resolve_preset(name, preset, face)]}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return LossWeights(**values)
