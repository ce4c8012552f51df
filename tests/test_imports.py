"""The import structure, read from the source with ``ast``: no cycles, and first-party imports at the top of modules.

The graph holds every module of edgekd/ and of the side folders under their installed names (kernels/ ->
edgekd.kernels, export/ -> edgekd.export, calib/ -> edgekd.calib). Imports inside functions count as edges (an
in-function import hides a cycle from Python, not from the layering), and so does a literal first-party name in a
module that calls ``import_module`` or ``__import__``; ``if TYPE_CHECKING:`` blocks do not run and are left out. Two
graphs must be acyclic: the modules, and the packages (``edgekd.eval`` importing ``edgekd.train`` while
``edgekd.train`` imports ``edgekd.eval`` is a cycle of layers even when no two modules close one). On the tree before
issue 13 they report the three cycles it names: export runtime <-> torch_tensorrt, pipeline <-> trt_export, and
kernels.shared_head_op <-> losses.shared_head.

A first-party import inside a function needs a reason: a comment on its line, or a comment line right above its
block of imports (an optional dependency such as onnx or triton behind it, the start-up time of ``edgekd --help``).
Third-party imports (triton, tensorrt, onnxruntime, timm) are not checked here: optional dependencies go inside
functions by rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"edgekd": "edgekd", "kernels": "edgekd.kernels", "export": "edgekd.export", "calib": "edgekd.calib"}
SIDE = ("kernels", "export", "calib")


def first_party_modules() -> dict[str, Path]:
    """Installed module name -> source file."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            if folder == "edgekd" and parts and parts[0] in SIDE:
                continue  # only a stray copy could live there; the package-dir mapping installs the side folders
            modules[".".join([package, *parts])] = path
    return modules


MODULES = first_party_modules()


def _resolve(name: str) -> str | None:
    """The first-party module that importing ``name`` loads last (a package for ``edgekd.pkg.function``)."""
    if name.split(".")[0] != "edgekd":
        return None
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else None


class _Imports(ast.NodeVisitor):
    """Every first-party import of one module: (target, line, inside a function, the reason comment if any)."""

    def __init__(self, module: str, lines: list[str]) -> None:
        self.module, self.lines = module, lines
        self.found: list[tuple[str, int, bool, bool]] = []
        self._depth = 0
        self._uses_importlib = False
        self._strings: list[tuple[str, int]] = []

    def _reasoned(self, node: ast.stmt, block_start: int) -> bool:
        own = any("#" in self.lines[i - 1] for i in range(node.lineno, (node.end_lineno or node.lineno) + 1))
        above = self.lines[block_start - 2].strip() if block_start >= 2 else ""
        return own or above.startswith("#")

    def _statements(self, body: list[ast.stmt]) -> None:
        block_start = None
        for stmt in body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                block_start = block_start or stmt.lineno
                self._record(stmt, block_start)
            else:
                block_start = None
                self.visit(stmt)

    def _record(self, node: ast.Import | ast.ImportFrom, block_start: int) -> None:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
            self._uses_importlib |= "importlib" in names
        else:
            base = node.module or ""
            if node.level:  # from .x import y: relative to this module's package
                package = self.module if MODULES[self.module].name == "__init__.py" else self.module.rsplit(".", 1)[0]
                package = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{package}.{base}" if base else package
            names = [f"{base}.{alias.name}" for alias in node.names]
            # from importlib import import_module is a dynamic import; from importlib import metadata is not
            self._uses_importlib |= base == "importlib" and any(alias.name == "import_module" for alias in node.names)
        for name in names:
            target = _resolve(name)
            if target is not None and target != self.module:
                self.found.append((target, node.lineno, self._depth > 0, self._reasoned(node, block_start)))

    def generic_visit(self, node: ast.AST) -> None:
        for field in ("body", "orelse", "finalbody"):
            value = getattr(node, field, None)
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                self._statements(value)
        for handler in getattr(node, "handlers", []):
            self._statements(handler.body)
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.stmt) and not isinstance(child, ast.excepthandler):
                self.visit(child)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            self._statements(node.orelse)  # the guarded imports never run
            return
        self.visit(node.test)
        self.generic_visit(node)

    def _function(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        self._uses_importlib |= name in ("__import__", "import_module")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and node.value in MODULES:
            self._strings.append((node.value, node.lineno))

    def visit_Module(self, node: ast.Module) -> None:
        self._statements(node.body)
        if self._uses_importlib:  # import_module("edgekd...") / __import__ of a literal name is an import too
            self.found += [(name, line, True, True) for name, line in self._strings if name != self.module]


def imports() -> dict[str, list[tuple[str, int, bool, bool]]]:
    found = {}
    for module, path in MODULES.items():
        source = path.read_text()
        visitor = _Imports(module, source.splitlines())
        visitor.visit(ast.parse(source, str(path)))
        found[module] = visitor.found
    return found


IMPORTS = imports()


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return [_cycle_through(sorted(c), edges) for c in components]


def _cycle_through(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A closed path inside ``component`` starting at its first node (breadth-first back to the start)."""
    members, start = set(component), component[0]
    previous = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges.get(v, ())):
            if w == start:
                path = [v]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if w in members and w not in previous:
                previous[w] = v
                queue.append(w)
    return component


def _describe(cycle: list[str], lines: dict[tuple[str, str], int]) -> str:
    return " -> ".join(
        f"{a} (line {lines[a, b]})" if (a, b) in lines else a for a, b in zip(cycle, [*cycle[1:], None], strict=True)
    )


def test_the_graph_reads_every_module_and_sees_in_function_imports():
    """The checks below are only as good as the graph: it must hold the side folders and late imports."""
    assert {"edgekd.kernels", "edgekd.export", "edgekd.calib", "edgekd.cli", "edgekd.train.loop"} <= set(MODULES)
    late = [target for found in IMPORTS.values() for target, _, inside, _ in found if inside]
    assert late, "no import inside a function found: the visitor misses them"
    cycles = find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cycles == [["a", "b", "c", "a"]]


def test_no_import_cycle_between_modules():
    edges: dict[str, set[str]] = {}
    lines: dict[tuple[str, str], int] = {}
    for module, found in IMPORTS.items():
        for target, line, _, _ in found:
            edges.setdefault(module, set()).add(target)
            lines.setdefault((module, target), line)
    cycles = find_cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c, lines) for c in cycles)


def test_no_import_cycle_between_packages():
    edges: dict[str, set[str]] = {}
    lines: dict[tuple[str, str], str] = {}
    for module, found in IMPORTS.items():
        for target, line, _, _ in found:
            a, b = _package(module), _package(target)
            if a != b and a != "edgekd":  # edgekd/__init__ re-exports; it is no layer
                edges.setdefault(a, set()).add(b)
                lines.setdefault((a, b), f"{module}:{line}")
    cycles = find_cycles(edges)
    described = [" -> ".join(f"{a} ({lines.get((a, b), '')})" for a, b in zip(c, c[1:], strict=False)) for c in cycles]
    assert not cycles, "package cycles:\n" + "\n".join(described)


def test_first_party_imports_inside_functions_say_why():
    missing = [
        f"{MODULES[module].relative_to(ROOT)}:{line}: {target}"
        for module, found in IMPORTS.items()
        for target, line, inside, reasoned in found
        if inside and not reasoned
    ]
    assert not missing, (
        "first-party imports inside functions without a comment saying why (optional dependency, start-up time); "
        "move them to the top of the module or add the reason:\n" + "\n".join(sorted(set(missing)))
    )


def test_no_package_imports_another_packages_private_module():
    """A module whose name starts with ``_`` is its package's own (``edgekd.kernels._launch``); other packages use the
    public modules (``edgekd.kernels.shared_head_math``, ``edgekd.kernels.sweeps``), so a package can change its
    private ones without breaking another's code. The tree's modules, and bench/ (first-party scripts), are checked."""
    offenders = [
        f"{MODULES[module].relative_to(ROOT)}:{line}: {target}"
        for module, found in IMPORTS.items()
        for target, line, _, _ in found
        if target.rsplit(".", 1)[-1].startswith("_") and _package(target) != _package(module)
    ]
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            private = [name for name in names if name.startswith("edgekd.") and "._" in name]
            offenders += [f"bench/{path.name}:{node.lineno}: {name}" for name in private]
    assert not offenders, "imports of another package's private module:\n" + "\n".join(offenders)
