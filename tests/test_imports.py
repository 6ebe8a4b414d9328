"""The package's import graph, built from the source: no cycle, dependencies pointing one way.

Run ``pytest -s tests/test_imports.py`` to print the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "skipit_core"

#: the layers, bottom first; a module may import only from its own layer or the ones below it
LAYERS = (
    {"errors", "paths"},
    {"stats", "utils", "models"},
    {"information", "forward", "skip.plan", "skip.runtime", "skip"},
    {"theory", "capture"},
    {"measures", "band", "distributed", "bench", "tasks.scenes", "tasks.datasets", "tasks.evaluation", "tasks",
     "tasks.__main__", "plotting"},
    {"zoo.build", "zoo", "zoo.train", "zoo.card", "zoo.pilot"},
    {"cli", ""},
)
#: imports allowed inside functions: optional packages, and torch in the torch-free ``utils``
LOCAL_IMPORTS = {("utils", "torch"), ("information", "threadpoolctl"), ("tasks.datasets", "datasets"),
                 ("zoo.build", "torchvision"), ("cli", "pyarrow")}


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{"capture": (path, False), "skip": (skip/__init__.py, True), "": (__init__.py, True), ...}``."""
    out = {}
    for f in SRC.rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (f, package)
    return out


def _targets(module: str, package: bool, node: ast.AST, modules: dict) -> list[str]:
    """The skipit_core modules an import statement loads (a package's submodule when it names one)."""
    if isinstance(node, ast.Import):
        names = [a.name.removeprefix("skipit_core").lstrip(".") for a in node.names
                 if a.name == "skipit_core" or a.name.startswith("skipit_core.")]
        return names
    if node.level == 0:
        if node.module != "skipit_core" and not (node.module or "").startswith("skipit_core."):
            return []
        base = node.module.removeprefix("skipit_core").lstrip(".")
    else:
        here = module.split(".") if module else []
        here = here if package else here[:-1]
        here = here[:len(here) - (node.level - 1)]
        base = ".".join(here + ([node.module] if node.module else []))
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        out.append(sub if sub in modules else base)
    return out


def import_graph() -> dict[str, set[str]]:
    """``{module: {modules it imports}}`` over every import statement, at any depth of the source."""
    modules, graph = _modules(), {}
    for module, (path, package) in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, package, node, modules):
                    while target not in modules:
                        target = target.rpartition(".")[0]
                    if target != module:
                        deps.add(target)
        graph[module] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules, or None (depth-first search, three colours)."""
    colour, stack = dict.fromkeys(graph, 0), []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == 1:
                return stack[stack.index(nxt):] + [nxt]
            if colour[nxt] == 0 and (found := visit(nxt)):
                return found
        colour[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if colour[node] == 0 and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_skipit_core():
    graph = import_graph()
    print("\nimport graph of skipit_core (module -> what it imports):")
    for module in sorted(graph):
        print(f"  {module or 'skipit_core'} -> {', '.join(sorted(graph[module])) or '-'}")
    assert len(graph) > 20 and "skip.runtime" in graph["skip"]
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_dependencies_point_one_way():
    """models <- forward plumbing <- capture/measures/theory; skip uses models; tasks and bench use skip."""
    level = {module: i for i, layer in enumerate(LAYERS) for module in layer}
    graph = import_graph()
    assert set(graph) == set(level), f"place new modules in LAYERS: {sorted(set(graph) ^ set(level))}"
    upward = [(m, d) for m, deps in graph.items() for d in deps if level[d] > level[m]]
    assert not upward, f"imports pointing up the layers: {upward}"
    assert not graph["skip.plan"] - {"errors", "models"} and "capture" not in graph["skip.runtime"]


def test_imports_sit_at_module_tops():
    """No import hidden inside a function, except optional packages and torch in the torch-free utils."""
    hidden = []
    for module, (path, _) in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        name = sub.module if isinstance(sub, ast.ImportFrom) else sub.names[0].name
                        if (module, (name or ".").split(".")[0]) not in LOCAL_IMPORTS:
                            hidden.append(f"{module}:{sub.lineno} {name}")
    assert not hidden, hidden
