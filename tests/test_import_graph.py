"""The plugin's import graph has floors: no cycle, nothing of the core imports upwards.

Read from the source (AST, no import), counting every import of ``megatron_locmoe``: at module
level and inside functions. ``from pkg import name`` counts as importing ``pkg`` (and
``pkg.name`` when that is a module); ``import pkg.mod`` as importing ``pkg.mod``.

The layering, bottom to top:

- the core: every module of ``megatron_locmoe/`` but the floors below; within it, leaves such as
  ``config``, ``graphs``, ``device``, ``topology``, ``capacity``, ``data.indexed``; then the
  routers and their registry (``routers``), the dispatcher, ``validation``, ``resolve``,
  experts / attention / layer / spec, ``arguments`` and the adaptor. The core imports nothing
  from the floors above it;
- ``sim/`` (the simulated cluster, the CPU trainer, test layers) on the core;
- ``analysis/`` (demo, sweep, report, placement, cost model) on the core and ``sim/``;
- ``launch/`` (presets and the launcher) on everything below;
- the ways in, above all: ``pretrain_gpt``, ``run``, ``patch_megatron_lm``.

A function-level import of the plugin's own code in the core says why it is not at the top
(a comment on its line or just above its block): lazy imports are not there to hide cycles.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = "megatron_locmoe"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE
UPPER_FLOORS = ("sim", "analysis", "launch")
WAYS_IN = ("pretrain_gpt", "run", "patch_megatron_lm")


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: pathlib.Path, modules: dict) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of the plugin's code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def owner(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                targets = [source] + [f"{source}.{a.name}" for a in child.names]
            imported = {owner(t) for t in targets if t == PACKAGE or t.startswith(PACKAGE + ".")}
            for module in sorted(imported - {None, name}):
                found.append((module, child.lineno, in_function))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def _graph():
    modules = _modules()
    edges = {name: {} for name in modules}  # module -> {imported: [(line, in function), ...]}
    for name, path in modules.items():
        for target, line, in_function in _imports(name, path, modules):
            edges[name].setdefault(target, []).append((line, in_function))
    return modules, edges


def _cycles(edges) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []
    counter = [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                components.append(sorted(component))

    for v in edges:
        if v not in index:
            connect(v)
    return components


def _floor(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in UPPER_FLOORS:
        return parts[1]
    if len(parts) > 1 and parts[1] in WAYS_IN:
        return "ways in"
    return "core"


def test_no_import_cycle_among_the_plugins_modules():
    modules, edges = _graph()
    cycles = _cycles(edges)
    report = [
        f"{len(c)} modules: "
        + "; ".join(
            f"{m} -> {t} ({modules[m].relative_to(ROOT.parent)}:{edges[m][t][0][0]})"
            for m in c
            for t in edges[m]
            if t in c
        )
        for c in cycles
    ]
    assert not cycles, "import cycles:\n" + "\n".join(report)


def test_the_core_imports_nothing_from_the_floors_above():
    modules, edges = _graph()
    upward = [
        f"{modules[m].relative_to(ROOT.parent)}:{line} imports {t}"
        for m in edges
        if _floor(m) == "core"
        for t, found in edges[m].items()
        if _floor(t) != "core"
        for line, _ in found
    ]
    assert not upward, "the core imports upwards:\n" + "\n".join(upward)


def _says_why(lines: list[str], line: int) -> bool:
    """A comment on the import's line, or on the line above its block of imports."""
    if "#" in lines[line - 1]:
        return True
    i = line - 2
    while i >= 0 and (not lines[i].strip() or lines[i].lstrip().startswith(("from ", "import "))):
        i -= 1
    return i >= 0 and lines[i].lstrip().startswith("#")


def test_function_level_imports_in_the_core_say_why():
    modules, edges = _graph()
    silent = []
    for m, targets in edges.items():
        if _floor(m) != "core":
            continue
        lines = modules[m].read_text().splitlines()
        for t, found in targets.items():
            for line, in_function in found:
                if in_function and not _says_why(lines, line):
                    silent.append(f"{modules[m].relative_to(ROOT.parent)}:{line} imports {t}")
    assert not silent, "function-level imports without a reason:\n" + "\n".join(silent)
