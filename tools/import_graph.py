"""The package's import graph: modules, imports, circles, and imports that reach up a layer.

    python3 tools/import_graph.py [PACKAGE_DIR]      # default: the jaxbrats/ beside this folder

Every `import` in a module counts, at its top or inside a function (a lazy import still ties the
two modules together). A circle is a strongly connected set of modules; an upward import is one
from a lower layer (`LAYERS`, low to high) to a higher one. Exits 1 when it finds either, so the
same check runs in the tests (tests/test_architecture.py).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

#: Layers, low to high: a module imports from its own layer or a lower one. The ground modules sit
#: at the package root beside the entry points.
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "jaxbrats",
        "jaxbrats.errors",
        "jaxbrats.config",
        "jaxbrats.files",
        "jaxbrats.modalities",
        "jaxbrats.labels",
        "jaxbrats.faces",
    ),
    ("jaxbrats.runtime",),
    ("jaxbrats.data",),
    ("jaxbrats.networks", "jaxbrats.losses"),
    ("jaxbrats.methods",),
    ("jaxbrats.engine",),
    ("jaxbrats.inference",),
    ("jaxbrats.evaluation",),
    ("jaxbrats.interop",),
    ("jaxbrats.cli", "jaxbrats.demo", "jaxbrats.__main__"),
)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports (a `from pkg import mod` names the module)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    found.add(f"{base}.{alias.name}")
                elif base in modules:
                    found.add(base)
    found.discard(name)
    return found


def layer_of(module: str) -> int:
    best, depth = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or (prefix != "jaxbrats" and module.startswith(prefix + "."))
            if inside and len(prefix) > depth:
                best, depth = index, len(prefix)
    if best < 0:
        raise SystemExit(f"{module}: in no layer of tools/import_graph.py's LAYERS")
    return best


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def package_graph(root: Path) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(paths)
    graph = {name: imports_of(path, name, modules) for name, path in paths.items()}
    # A submodule's import runs its package's __init__ first: that is not an import by the submodule.
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}


def report(root: Path) -> tuple[dict, list[list[str]], list[tuple[str, str]]]:
    graph = package_graph(root)
    upward = sorted((m, d) for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))
    return graph, circles(graph), upward


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "jaxbrats"
    graph, found_circles, upward = report(root)
    print(
        f"{len(graph)} modules, {sum(map(len, graph.values()))} imports between them, "
        f"{len(found_circles)} circles, {len(upward)} upward imports"
    )
    for component in found_circles:
        print("circle:", " <-> ".join(component))
    for module, dep in upward:
        print(f"upward: {module} (layer {layer_of(module)}) imports {dep} (layer {layer_of(dep)})")
    return 1 if found_circles or upward else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
