"""The layering of docs/architecture.md, checked from the source: `imgsim`'s sub-packages import one
another without cycles, and nothing in `imgsim/` imports `pipelines` or `serve` (the layers above it).

Static: every `import` statement of `imgsim/**/*.py` is read with `ast`, lazy ones inside functions
and `if TYPE_CHECKING:` blocks included, since a lazy import is still a dependency. The CLI's
dispatch table names the commands' modules as strings (`imgsim.cli.COMMANDS`): that is dispatch,
not an import, and stays allowed.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "imgsim"
UPPER_LAYERS = ("pipelines", "serve")


def module_name(path: Path, root: Path = ROOT) -> str:
    """`imgsim/index/knn.py` → `imgsim.index.knn`; a package's `__init__.py` → the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str, root: Path = ROOT) -> bool:
    """Is `name` (dotted) a module or package under `root`?"""
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """(module imported, line) for every import statement in the file, wherever it stands."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package, one level up per extra dot
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from imgsim.index import knn` imports the module imgsim.index.knn
                sub = f"{source}.{alias.name}"
                found.append((sub if is_module(sub, root) else source, node.lineno))
    return found


def unit_of(module: str) -> str:
    """The node of the package graph a module belongs to: `imgsim.<sub-package or top-level module>`,
    or `imgsim` for the package's own `__init__`."""
    return ".".join(module.split(".")[:2])


def import_graph(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """unit → {imported unit: ["file:line", ...]} over root/imgsim/, self-imports left out."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted((root / "imgsim").rglob("*.py")):
        here = unit_of(module_name(path, root))
        for module, line in imported_modules(path, root):
            if module.split(".")[0] != "imgsim" or unit_of(module) == here:
                continue
            places, where = graph[here][unit_of(module)], f"{path.relative_to(root)}:{line}"
            if where not in places:
                places.append(where)
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None when it is acyclic (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" once fully explored
    path: list[str] = []

    def visit(unit: str) -> list[str] | None:
        state[unit] = "open"
        path.append(unit)
        for target in sorted(graph.get(unit, {})):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[unit] = "done"
        return None

    for unit in sorted(graph):
        if unit not in state and (cycle := visit(unit)):
            return cycle
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, list[str]]]) -> str:
    return "\n".join(f"{a} -> {b} at {', '.join(graph[a][b])}" for a, b in pairwise(cycle))


def test_imgsim_sub_packages_import_each_other_without_cycles() -> None:
    graph = import_graph()
    assert "imgsim.index" in graph and "imgsim.duplicates" in graph  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between imgsim's sub-packages:\n" + describe(cycle, graph)


def test_imgsim_never_imports_pipelines_or_serve() -> None:
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for module, line in imported_modules(path)
        if module.split(".")[0] in UPPER_LAYERS
    ]
    assert upward == []


def test_a_lazy_relative_import_that_closes_a_cycle_is_found(tmp_path: Path) -> None:
    """The checks themselves, on a made-up package: `a` imports `b` at the top, `b` imports `a` back
    lazily, inside a function, with a relative import; the cycle is reported with its line."""
    for folder, text in {
        "imgsim": "",
        "imgsim/a": "from imgsim.b import thing\n",
        "imgsim/b": "def thing():\n    from ..a import other\n    return other\n",
    }.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text(text)
    (tmp_path / "imgsim" / "a" / "other.py").write_text("")
    graph = import_graph(tmp_path)
    assert find_cycle(graph) in (["imgsim.a", "imgsim.b", "imgsim.a"], ["imgsim.b", "imgsim.a", "imgsim.b"])
    assert graph["imgsim.b"]["imgsim.a"] == ["imgsim/b/__init__.py:2"]
    assert find_cycle({"imgsim.a": {"imgsim.b": ["x:1"]}, "imgsim.b": {}}) is None
