"""``shared_head_loss``: the one entry point for every loss term of SPEC §3, over interchangeable backends.

A backend computes the head terms (``ce``, ``kd``, ``th_ce``, ``th_kd``) from embeddings and class
matrices, with the signature of ``shared_head_loss_reference``; ``l2e`` is cheap and always computed here in
PyTorch. The backends are ``reference`` (this package) and every sweep of ``edgekd.kernels.sweeps`` (``chunked``,
the PyTorch op, and ``triton``, the Triton op, imported on first use because Triton is an optional dependency). The
dependency runs one way: ``edgekd.kernels`` imports nothing from here.

Precision. The loss does not follow autocast: training on CUDA runs the backbone under bf16 autocast by default
(``--amp``: fp16, or none), and its 16-bit embedding reaches the loss promoted to the head's dtype (exactly: float32
for float32 heads). Every backend then forms the logits from operands in that dtype and keeps its statistics
(log-sum-exps, the margin, the KL sums) in float32: the fused Triton kernels' precision, which the chunked sweep,
the reference and the class-sharded op share, so that switching backend never changes what is trained beyond float32
rounding. Rounding the logits themselves to bf16, as autocast would, costs up to s·2⁻⁹ = 0.125 per logit at
ArcFace's s = 64, in a softmax over all classes.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch

from edgekd.errors import EdgekdError, EdgekdWarning, MissingDependency
from edgekd.heads.class_sampling import relabel
from edgekd.heads.margin import HeadSpec
from edgekd.kernels.sweeps import SWEEPS
from edgekd.losses.reference import shared_head_loss_reference
from edgekd.losses.terms import LossWeights, l2_embedding

LossBackend = Callable[..., dict[str, torch.Tensor]]
# The reference and every sweep that needs torch alone; a sweep with an optional package joins on first use
# (load_backend). The sweeps themselves are listed once, in edgekd.kernels.sweeps.
LOSS_BACKENDS: dict[str, LossBackend] = {
    "reference": shared_head_loss_reference,
    **{name: sweep.loss_backend() for name, sweep in SWEEPS.items() if sweep.requires is None},
}
_LOAD_ERRORS: dict[str, EdgekdError] = {}


def _load_sweep(name: str) -> LossBackend:
    sweep = SWEEPS[name]
    if sweep.requires and importlib.util.find_spec(sweep.requires) is None:
        raise MissingDependency(
            f"loss backend {name!r} needs the {sweep.requires} package, which is not installed; pip install "
            f"{sweep.requires}, or use the chunked backend"
        )
    return sweep.loss_backend()


def register_loss_backend(name: str, fn: LossBackend) -> LossBackend:
    """Add a backend under ``name``; it must return the same terms as the reference."""
    LOSS_BACKENDS[name] = fn
    return fn


def list_loss_backends() -> list[str]:
    """Backend names a user may pass, ``auto`` first; optional sweeps are listed even where they cannot load."""
    registered = (name for name in LOSS_BACKENDS if name not in SWEEPS and name != "reference")
    return ["auto", "reference", *SWEEPS, *registered]


def load_backend(name: str) -> LossBackend:
    """The backend called ``name``, importing an optional one on first use.

    Raises:
        EdgekdError: one line naming the backend: unknown, its dependency not installed (``MissingDependency``),
            or its module failed to import. There is no fallback to another backend.
    """
    if name in LOSS_BACKENDS:
        return LOSS_BACKENDS[name]
    if name not in SWEEPS:
        raise EdgekdError(f"unknown loss backend {name!r}; choose one of {', '.join(list_loss_backends())}")
    if name not in _LOAD_ERRORS:
        try:
            return register_loss_backend(name, _load_sweep(name))
        except EdgekdError as exc:
            _LOAD_ERRORS[name] = exc
        except Exception as exc:  # a broken install or module: name it instead of running without the backend
            error = EdgekdError(f"loss backend {name!r} failed to load: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            _LOAD_ERRORS[name] = error  # a retry would re-register the half-imported module's op
    raise _LOAD_ERRORS[name]


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete, loaded backend for ``name``: ``auto`` is triton on CUDA, chunked elsewhere.

    On CUDA, ``auto`` uses chunked when the triton backend cannot load, and warns with the reason; any other name
    that cannot load raises (``load_backend``). Resolve once, outside compiled code: the first call may import
    backend modules, which Dynamo cannot trace.
    """
    if name in LOSS_BACKENDS:
        return name
    if name != "auto":
        load_backend(name)
        return name
    if device.type != "cuda":
        return "chunked"
    try:
        load_backend("triton")
    except EdgekdError as exc:
        warnings.warn(f"loss backend auto: using chunked, not triton: {exc}", EdgekdWarning, stacklevel=2)
        return "chunked"
    return "triton"


def _check_inputs(z_s, labels, W_s, W_t, z_t, weights: LossWeights) -> None:
    if z_s.ndim != 2 or labels.ndim != 1 or labels.shape[0] != z_s.shape[0]:
        raise EdgekdError(
            f"shared_head_loss needs z_s (B, D) and labels (B,); got {tuple(z_s.shape)} and {tuple(labels.shape)}"
        )
    if (weights.ce or weights.kd) and W_s is None:
        raise EdgekdError("the ce and kd terms need a student head W_s; set their weights to 0 or pass W_s")
    if weights.reads_teacher_head and W_t is None:
        raise EdgekdError("the kd, th_ce and th_kd terms need the teacher head W_t")
    if weights.reads_teacher_embedding and z_t is None:
        raise EdgekdError("the kd, th_kd and l2e terms need the teacher embedding z_t")
    if W_s is not None and W_s.shape[1] != z_s.shape[1]:
        raise EdgekdError(f"student head width {W_s.shape[1]} != student embedding width {z_s.shape[1]}")
    if (weights.th_ce or weights.th_kd) and W_t.shape[1] != z_s.shape[1]:
        raise EdgekdError(
            f"the teacher head reads {W_t.shape[1]}-d embeddings but the student's are {z_s.shape[1]}-d; "
            f"build the student at the teacher's width (embed_dim {W_t.shape[1]})"
        )
    if (weights.kd or weights.th_kd) and W_t.shape[1] != z_t.shape[1]:
        raise EdgekdError(f"teacher head width {W_t.shape[1]} != teacher embedding width {z_t.shape[1]}")
    if weights.l2e and z_s.shape[1] != z_t.shape[1]:
        raise EdgekdError(
            f"l2e compares the student's {z_s.shape[1]}-d embedding with the teacher's {z_t.shape[1]}-d one; "
            f"build the student at the teacher's width (embed_dim {z_t.shape[1]})"
        )
    if W_s is not None and W_t is not None and W_s.shape[0] != W_t.shape[0]:
        raise EdgekdError(f"student head has {W_s.shape[0]} classes but the teacher head {W_t.shape[0]}")


def backend_calls(weights: LossWeights) -> list[LossWeights]:
    """The head terms split into backend calls of one temperature each: backends form kd and th_kd at ``T``.

    kd and th_kd at different temperatures need the teacher's softmax twice; the chunked and Triton sweeps hold one
    (its log-sum-exp per row), so th_kd then gets a second call that recomputes the teacher logits (one more
    B×C×D_t product) instead of a second set of per-row statistics in every kernel.
    """
    # The common cases build no new LossWeights: a dataclass made inside a compiled step broke Dynamo's recompile
    # ("torch.* op returned non-Tensor", torch 2.14). Backends ignore l2e.
    if not weights.th_kd or weights.T == weights.T_th:
        return [weights]
    if not weights.kd:
        return [replace(weights, T=weights.T_th)]
    return [replace(weights, th_kd=0.0), LossWeights(ce=0.0, th_kd=weights.th_kd, T=weights.T_th, T_th=weights.T_th)]


def shared_head_loss(
    z_s: torch.Tensor,
    labels: torch.Tensor,
    *,
    W_s: torch.Tensor | None = None,
    b_s: torch.Tensor | None = None,
    W_t: torch.Tensor | None = None,
    b_t: torch.Tensor | None = None,
    z_t: torch.Tensor | None = None,
    head: HeadSpec,
    weights: LossWeights,
    backend: str | LossBackend = "auto",
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss ``Σ weight·term`` and the terms for one batch.

    Args:
        z_s: (B, D_s) student embedding; receives gradients.
        labels: (B,) int64 class ids in ``[0, C)``.
        W_s: (C, D_s) student head (trainable, may be None when ce and kd are off); b_s: (C,) its bias.
        W_t: (C, D_t) frozen teacher head; b_t: (C,) its bias. Never receive gradients.
        z_t: (B, D_t) teacher embedding; no gradient.
        head: how logits are formed (kind, s, m); shared by both heads.
        weights: term weights and the temperatures T (kd) and T_th (th_kd).
        backend: ``auto``, ``reference``, ``chunked`` or ``triton``; or a function with their signature, such as
            the class-sharded loss of ``edgekd.distributed.make_sharded_backend`` (heads then are this rank's shards).
        rows: Partial FC sampling (``edgekd.heads.class_sampling``): the sorted rows of the heads this step computes;
            every head term is then over those classes (labels stay the full head's ids). A backend function gets
            ``rows`` as a keyword and relabels itself (a shard sees other ranks' labels); None: every class.

    Returns:
        ``(total, terms)``: a scalar with gradients, and each active term's value. The terms are not detached
        here: under torch.compile (inductor, torch 2.14) returning ``term.detach()`` beside a total that simplifies
        to the same buffer (one term, weight 1) drops the total's gradient; detach them after the call.
    """
    _check_inputs(z_s, labels, W_s, W_t, z_t, weights)
    fn = backend if callable(backend) else LOSS_BACKENDS[resolve_backend(backend, z_s.device)]
    sampled = {}  # what a backend function is told of the sampled rows
    if rows is not None:
        W_s, b_s, W_t, b_t = (None if w is None else w.index_select(0, rows) for w in (W_s, b_s, W_t, b_t))
        if callable(backend):
            sampled = {"rows": rows}
        else:
            labels = relabel(labels, rows)
    terms: dict[str, torch.Tensor] = {}
    # Autocast stops here (module doc, "Precision"): every backend computes the terms alike under it.
    with torch.autocast(z_s.device.type, enabled=False):
        z_s, z_t = (_to_head_dtype(z, W_s if W_s is not None else W_t) for z in (z_s, z_t))
        for call in backend_calls(weights):
            # Both heads read the student's one embedding (the official code's design): z_s is also the backends' z_st.
            terms.update(fn(z_s, labels, W_s, b_s, z_s, W_t, b_t, z_t, head, call, **sampled))
        if weights.l2e:
            terms["l2e"] = l2_embedding(z_s, z_t)
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, terms


def _to_head_dtype(z: torch.Tensor | None, W: torch.Tensor | None) -> torch.Tensor | None:
    """``z`` promoted to the head's dtype (a bf16 embedding of an autocast backbone, float32 head: float32)."""
    if z is None or W is None:
        return z
    return z.to(torch.promote_types(z.dtype, W.dtype))


def head_loss_fn(head, teacher_head, weights: LossWeights, backend: str | LossBackend):
    """``loss(z_s, labels, z_t, rows=None) -> (total, terms)`` through ``head`` (the student's ``ClassHead``) and
    ``teacher_head`` (frozen, or None), read at each call so that a compiled step sees their parameters.

    The student head's tensors are passed only when a term reads them (ce, kd): vanilla SH-KD stages and TH-only
    weights train without them.
    """
    uses_student_head = bool(weights.ce or weights.kd)

    def loss(z_s: torch.Tensor, labels: torch.Tensor, z_t: torch.Tensor | None, rows: torch.Tensor | None = None):
        return shared_head_loss(
            z_s,
            labels,
            W_s=head.weight if uses_student_head else None,
            b_s=head.bias if uses_student_head else None,
            W_t=teacher_head.weight if teacher_head is not None else None,
            b_t=teacher_head.bias if teacher_head is not None else None,
            z_t=z_t,
            head=head.spec,
            weights=weights,
            backend=backend,
            rows=rows,
        )

    return loss
