"""arcface_torch's config files and names, read as edgekd's settings (README "Coming from arcface_torch").

An arcface_torch config is a Python file (``configs/ms1mv3_r50.py``: ``config = edict()``, then ``config.KEY = value``
lines). ``read_python_config`` parses it with ``ast`` and reads only those assignments of literal values: the file is
never run, so a config can neither run code nor hide a value behind a computation. YAML/TOML/JSON files may use the
same keys. ``translate`` turns arcface_torch's keys into edgekd's settings and says, one line per key, what each
became or why it is ignored; a key whose meaning edgekd cannot give (AdamW, the combined margin, gradient
accumulation) is a one-line error instead of a silently different run.

Two keys differ in meaning, not only in name: arcface_torch's ``batch_size`` is per GPU and edgekd's ``--batch-size``
the global batch (it becomes ``batch_size × processes``), and ``margin_list`` (m1, m2, m3) names the head.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekd.data import bin_files_beside, resolve_data
from edgekd.errors import EdgekdError
from edgekd.models import require_model
from edgekd.rules import is_int, is_real

# Keys arcface_torch and edgekd spell alike. In a file of arcface_torch's (a .py, or one with arcface_torch's own
# keys) they are arcface_torch's, batch_size per GPU; in an edgekd file they are edgekd's, as always.
SHARED_KEYS = frozenset(
    {"lr", "momentum", "weight_decay", "seed", "sample_rate", "embedding_size", "num_workers", "batch_size"}
)
# The edgekd setting each renamed arcface_torch key sets.
RENAMED = {
    "network": "model",
    "rec": "data",
    "num_epoch": "epochs",
    "warmup_epoch": "warmup_epochs",
    "output": "out",
    "frequent": "log_every",
}
# arcface_torch keys edgekd has nothing to do with, and why.
IGNORED = {
    "num_image": "edgekd counts the images of --data",
    "dali": "edgekd reads RecordIO with its own loader",
    "dali_aug": "edgekd reads RecordIO with its own loader",
    "save_all_states": "edgekd's checkpoints always hold the optimizer and the head",
    "resume": "continue a run with `--out OUT --resume` on the command line",
    "suffix_run_name": "no wandb in edgekd: it logs to OUT/metrics.jsonl",
    "using_wandb": "no wandb in edgekd: it logs to OUT/metrics.jsonl",
    "wandb_key": "no wandb in edgekd: it logs to OUT/metrics.jsonl",
    "wandb_entity": "no wandb in edgekd: it logs to OUT/metrics.jsonl",
    "wandb_project": "no wandb in edgekd: it logs to OUT/metrics.jsonl",
    "wandb_log_all": "no wandb in edgekd: it logs to OUT/metrics.jsonl",
    "wandb_resume": "no wandb in edgekd: it logs to OUT/metrics.jsonl",
    "save_artifacts": "no wandb in edgekd: it logs to OUT/metrics.jsonl",
}
# Never echoed: a config's wandb API key is a secret.
SECRET_KEYS = frozenset({"wandb_key"})


@dataclass(frozen=True)
class Run:
    """What the mapping needs to know of the run: the option of each edgekd key (``--workers`` for num_workers), the
    training processes (a per-GPU batch times them is the global batch), the data the run reads as far as known (the
    command line's ``--data``, else the file's ``rec``) and the command line's ``--pairs``."""

    options: dict[str, str]
    processes: int
    data: str | None
    pairs: str | None

    def option(self, key: str) -> str:
        """The option that sets ``key`` (``--workers`` for num_workers)."""
        return self.options.get(key, "--" + key.replace("_", "-"))


def read_python_config(path: Path) -> dict:
    """The ``config.KEY = value`` assignments of an arcface_torch config file, by ``ast``, in file order.

    Imports and the ``config = edict()`` line are the file's frame and are passed over. A computed value is read
    only for a key edgekd ignores (it stays the source text, for the note); any other statement, or a computed value
    of a key edgekd uses, is a one-line error: edgekd does not run the file, so it cannot know the value.
    """
    text = path.read_text()
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as exc:
        raise EdgekdError(f"cannot parse config file {path}: line {exc.lineno}: {exc.msg}") from None
    values = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) or _makes_config(node) or _is_docstring(node):
            continue
        key = _config_key(node)
        if key is None:
            raise EdgekdError(
                f"{path} line {node.lineno}: edgekd reads only `config.KEY = value` lines of an arcface_torch config "
                "(it does not run the file); remove or rewrite this line"
            )
        try:
            values[key] = ast.literal_eval(node.value)
        except ValueError:
            source = ast.get_source_segment(text, node.value)
            if key not in IGNORED:
                raise EdgekdError(
                    f"{path} line {node.lineno}: config.{key} = {source} is computed, and edgekd does not run the "
                    "file; write the value itself"
                ) from None
            values[key] = source
    return values


def _makes_config(node: ast.stmt) -> bool:
    """``config = edict()`` (or ``EasyDict()``, ``dict()``): the object the file fills."""
    return (
        isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["config"]
        and isinstance(node.value, ast.Call)
        and not node.value.args
        and not node.value.keywords
    )


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _config_key(node: ast.stmt) -> str | None:
    """KEY of ``config.KEY = value``; None for any other statement."""
    if not isinstance(node, ast.Assign) or len(node.targets) != 1:
        return None
    target = node.targets[0]
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "config":
        return target.attr
    return None


def is_arcface_file(path: Path, raw: dict) -> bool:
    """Whether the file speaks arcface_torch's names: a .py config, or one that holds a key only arcface_torch has
    (margin_list aside: it means the same in an edgekd file)."""
    return path.suffix == ".py" or any(key in ARCFACE_KEYS - SHARED_KEYS - {"margin_list"} for key in raw)


def margin_list_head(margins: Any, where: str) -> tuple[str, float]:
    """``(head, margin)`` of arcface_torch's combined margin (m1, m2, m3): ``(1, m, 0)`` is ArcFace m, ``(1, 0, m)``
    CosFace m, ``(1, 0, 0)`` the plain cosine head. Any other combination is a one-line error naming the values:
    edgekd's heads are ArcFace and CosFace, and the combined margin (m1 != 1, or both m2 and m3) is not one of them."""
    if not isinstance(margins, (list, tuple)) or len(margins) != 3 or not all(is_real(m) for m in margins):
        raise EdgekdError(f"{where}margin_list is {margins!r}; give three numbers m1, m2, m3, e.g. 1.0, 0.5, 0.0")
    m1, m2, m3 = (float(m) for m in margins)
    if m1 == 1 and m2 >= 0 and m3 >= 0 and not (m2 and m3):
        if m2:
            return "arcface", m2
        return ("cosface", m3) if m3 else ("cosine", 0.0)
    raise EdgekdError(
        f"{where}margin_list ({m1:g}, {m2:g}, {m3:g}) is not supported: edgekd's heads are ArcFace (1, m, 0) and "
        "CosFace (1, 0, m); the combined margin (m1 != 1, or m2 and m3 together) is not one of them"
    )


def translate(raw: dict, path: Path, run: Run) -> tuple[dict, list[str]]:
    """``raw`` (a config file's mapping) with arcface_torch's keys turned into edgekd's settings, and the note lines
    saying what each became. Keys of edgekd's own pass through unchanged and unnoted; values are checked afterwards,
    as every config file's are (``check_setting_values``)."""
    arcface = is_arcface_file(path, raw)
    settings, notes = {}, []
    for key, value in raw.items():
        if key not in ARCFACE_KEYS or (key in SHARED_KEYS and not arcface):
            settings[key] = value  # edgekd's own key: checked as any config file's
            continue
        shown = "<hidden>" if key in SECRET_KEYS else _shown(value)
        if key in IGNORED:
            notes.append(f"arcface_torch {key}={shown}: ignored ({IGNORED[key]})")
            continue
        made, said = _HANDLERS[key](value, run) if key in _HANDLERS else _renamed(key, value, run)
        for target in made:
            if target in raw and target != key:
                raise EdgekdError(
                    f"--config {path}: {key} (arcface_torch's name) and {target} both set {run.option(target)}; "
                    "keep one"
                )
        settings.update(made)
        notes.append(f"arcface_torch {key}={shown} -> {said}" if made else f"arcface_torch {key}={shown}: {said}")
    return settings, notes


def _renamed(key: str, value: Any, run: Run) -> tuple[dict, str]:
    target = RENAMED.get(key, key)
    if target == "out" and value is None:
        return {}, "ignored (arcface_torch's work_dirs/<config>; edgekd's --out default applies)"
    return {target: value}, f"{run.option(target)} {_shown(value)}"


def _network(value: Any, run: Run) -> tuple[dict, str]:
    if isinstance(value, str):
        try:
            require_model(value)
        except EdgekdError as exc:
            raise EdgekdError(f"arcface_torch network={value}: edgekd has no such backbone: {exc}") from None
    return {"model": value}, f"--model {_shown(value)}"


def _batch_size(value: Any, run: Run) -> tuple[dict, str]:
    if not is_int(value) or value < 1:
        return {"batch_size": value}, f"--batch-size {_shown(value)}"  # its rule's error names the value
    processes = f"{run.processes} process{'es' if run.processes > 1 else ''}"
    return {"batch_size": value * run.processes}, (
        f"--batch-size {value * run.processes} (arcface_torch's is per GPU, edgekd's the global batch: "
        f"{value} x {processes})"
    )


def _margin_list(value: Any, run: Run) -> tuple[dict, str]:
    head, margin = margin_list_head(value, "arcface_torch ")
    return {"head": head, "margin": margin}, f"--head {head} --margin {margin:g}"


def _fp16(value: Any, run: Run) -> tuple[dict, str]:
    """arcface_torch's fp16 (autocast to float16 with a loss scaler, or float32) is edgekd's --fp16 or --fp32: not
    edgekd's own default, bf16 on CUDA."""
    if not isinstance(value, bool):
        raise EdgekdError(f"arcface_torch fp16 is {value!r}; give True or False")
    amp = "fp16" if value else "fp32"
    return {"amp": amp}, f"--amp {amp}"


def _num_classes(value: Any, run: Run) -> tuple[dict, str]:
    known = _data_classes(run.data)
    if known is None:
        return {}, "ignored (edgekd takes the class count from --data)"
    if value != known[0]:
        raise EdgekdError(
            f"arcface_torch num_classes={_shown(value)} but {known[1]} says {known[0]}: the config is for other data; "
            "correct num_classes or --data"
        )
    return {}, f"checked: {known[1]} says {known[0]} too"


def _data_classes(data: str | None) -> tuple[int, Path] | None:
    """The class count the ``property`` file beside a RecordIO ``train.rec`` states (insightface's
    ``classes,height,width``) and that file; None where there is none to read."""
    try:
        source = resolve_data(data) if data else None
    except EdgekdError:
        return None  # the run's own data check says what is wrong with it
    if source is None or source.kind != "recordio":
        return None
    prop = source.path.parent / "property"
    try:
        return int(prop.read_text().split(",")[0]), prop
    except (OSError, ValueError):
        return None


def _val_targets(value: Any, run: Run) -> tuple[dict, str]:
    if "pairs" not in run.options:
        return {}, "ignored (edgekd teacher verifies on every .bin beside --data, with --eval-every)"
    if not isinstance(value, (list, tuple)) or not all(isinstance(name, str) for name in value):
        raise EdgekdError(f"arcface_torch val_targets is {value!r}; give a list of .bin names, e.g. ['lfw', 'cfp_fp']")
    beside = {p.stem: p for p in _bins_beside(run.data)}
    present = [name for name in value if name in beside]
    missing = [name for name in value if name not in beside]
    if not present:
        return {}, f"ignored (no {', '.join(missing) or 'sets'} beside --data: arcface_torch skips missing sets too)"
    skipped = f"; {', '.join(missing)} not beside --data: skipped, as arcface_torch skips them" if missing else ""
    if len(present) == 1:
        return {"pairs": str(beside[present[0]])}, f"--pairs {beside[present[0]]}{skipped}"
    if set(present) == set(beside):
        return {}, f"every .bin beside --data, edgekd's default without --pairs{skipped}"
    extra = ", ".join(sorted(set(beside) - set(present)))
    return {}, f"every .bin beside --data, edgekd's default without --pairs ({extra} too: --pairs takes one){skipped}"


def _verbose(value: Any, run: Run) -> tuple[dict, str]:
    if not _has_pair_sets(run):
        return {}, "ignored (no verification sets beside --data for --eval-every)"
    return {"eval_every": value}, f"--eval-every {_shown(value)}"


def _has_pair_sets(run: Run) -> bool:
    """Whether the run has verification sets to verify on during training: ``--pairs``, synthetic data's held-out
    pairs (the demo's too), or .bin files beside the data."""
    if run.pairs or run.data is None:
        return True
    try:
        synthetic = resolve_data(run.data).kind == "synthetic"
    except EdgekdError:
        return False
    return synthetic or bool(_bins_beside(run.data))


def _bins_beside(data: str | None) -> list[Path]:
    try:
        return bin_files_beside(data) if data else []
    except EdgekdError:
        return []  # the run's own data check says what is wrong with it


def _only_default(key: str, default: Any, reason: str) -> Callable[[Any, Run], tuple[dict, str]]:
    """A key edgekd follows only at arcface_torch's default, which is edgekd's behaviour: any other value is a
    one-line error saying ``reason``, not a run that silently differs."""

    def handle(value: Any, run: Run) -> tuple[dict, str]:
        if value != default or type(value) is bool:
            raise EdgekdError(f"arcface_torch {key}={_shown(value)}: {reason}")
        return {}, "ignored (edgekd does the same)"

    return handle


_HANDLERS: dict[str, Callable[[Any, Run], tuple[dict, str]]] = {
    "network": _network,
    "batch_size": _batch_size,
    "margin_list": _margin_list,
    "fp16": _fp16,
    "num_classes": _num_classes,
    "val_targets": _val_targets,
    "verbose": _verbose,
    "optimizer": _only_default("optimizer", "sgd", "edgekd trains with SGD only; use optimizer = 'sgd'"),
    "gradient_acc": _only_default(
        "gradient_acc", 1, "edgekd has no gradient accumulation; use gradient_acc = 1 and a larger batch_size"
    ),
    "interclass_filtering_threshold": _only_default(
        "interclass_filtering_threshold", 0, "edgekd's heads have no inter-class filtering; use 0"
    ),
}


def _shown(value: Any) -> str:
    """A config value as the note shows it: strings bare, the rest as Python writes them."""
    return value if isinstance(value, str) else repr(value)


# Every arcface_torch key edgekd knows.
ARCFACE_KEYS = frozenset(SHARED_KEYS | set(RENAMED) | set(IGNORED) | set(_HANDLERS))
