"""fastlm's import graph follows shared/DESIGN.md's layer table.

Every import counts, at the top of a file or inside a function (a lazy import is a
dependency all the same). Two rules: a package imports only what its row of the table's
"may import" column allows (and what those may import in turn); and no two modules import
each other, directly or around a loop, so every file can be read and loaded bottom-up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# DESIGN.md's "may import (fastlm)" column, one row per package. `errors` (the one-line
# refusals every layer raises), `lazy` (the packages' PEP 562 exports) and `build_config`
# sit at the bottom with `backend`.
BOTTOM = {"backend", "build_config", "errors", "lazy"}
MAY_IMPORT = {
    "kernels": {"build_config"},
    "backend": {"_C"},  # whether the CUDA extension is built
    "build_config": set(),
    "errors": set(),
    "lazy": set(),
    "_C": set(),
    "ops": {"kernels", "_C"} | BOTTOM,
    "testing": {"ops"},
    "nn": {"ops"},
    "data": {"ops"},
    "peft": {"nn", "ops"},
    "quant": {"nn", "ops"},
    "models": {"nn", "ops", "peft", "quant", "data"},
    "parallel": {"nn", "ops"},
    "eval": {"models", "data", "parallel"},
    "train": {"models", "parallel", "data", "peft", "quant", "eval"},
    "cli": {"train", "eval", "models", "parallel", "data", "peft", "quant", "nn", "ops"},
}


def allowed(package: str) -> set[str]:
    """``package``'s row and, transitively, what the packages it names may import."""
    seen, todo = set(), [package]
    while todo:
        for below in MAY_IMPORT[todo.pop()] | BOTTOM:
            if below not in seen:
                seen.add(below)
                todo.append(below)
    return seen - {package}


def source_files() -> list[Path]:
    return sorted(
        p for top in ("fastlm", "kernels") for p in (REPO / top).rglob("*.py") if p.is_file()
    )


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "kernels":  # installed as fastlm.kernels
        parts.insert(0, "fastlm")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "fastlm" and len(parts) > 1 else None


def imports(path: Path, modules: set[str]) -> dict[str, int]:
    """The fastlm modules ``path`` imports (the longest known prefix of each name), with the
    line of the first import of each."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("kernels") and path.parts[-2:-1] == ("kernels",):
                name = "fastlm." + name  # the launchers' own absolute imports
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != here:
                found.setdefault(name, node.lineno)
    return found


def graph() -> dict[str, dict[str, int]]:
    files = {module_name(p): p for p in source_files()}
    return {m: imports(p, set(files) | {"fastlm._C"}) for m, p in files.items()}


GRAPH = graph()


def where(module: str, line: int) -> str:
    return f"{module} (line {line})"


def test_every_import_points_down_the_layer_table():
    wrong = []
    for module, targets in GRAPH.items():
        mine = package_of(module)
        if mine is None:  # fastlm/__init__.py: the public face, above every layer
            continue
        if mine not in MAY_IMPORT:
            wrong.append(f"{module}: package {mine!r} has no row in DESIGN's layer table")
            continue
        for target, line in targets.items():
            theirs = package_of(target)
            if theirs not in (None, mine) and theirs not in allowed(mine):
                wrong.append(f"{where(module, line)} imports {target}: {mine} -> {theirs}")
    assert not wrong, "imports that point up the layer table:\n" + "\n".join(wrong)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_two_packages_import_each_other():
    edges: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        mine = package_of(module)
        for target in targets:
            theirs = package_of(target)
            if mine and theirs and theirs != mine:
                edges.setdefault(mine, set()).add(theirs)
    assert cycles(edges) == [], f"package cycles: {cycles(edges)}"


def test_no_two_modules_import_each_other():
    # The root package is the public face: it re-exports from every layer, and no module
    # may import it (checked here too: any edge back to it closes a loop).
    edges = {m: set(t) for m, t in GRAPH.items()}
    found = cycles(edges)
    detail = [
        " <-> ".join(found_cycle)
        + ": "
        + ", ".join(
            where(a, GRAPH[a][b]) + f" imports {b}"
            for a in found_cycle
            for b in GRAPH[a]
            if b in found_cycle
        )
        for found_cycle in found
    ]
    assert not found, "module cycles:\n" + "\n".join(detail)


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": {"c"}}, []),
    ],
)
def test_cycle_finder(edges, expected):
    assert cycles(edges) == expected


def test_the_graph_sees_lazy_and_relative_imports():
    # The checks above are only as good as the graph: a known lazy import (inside a
    # function) and the ops -> kernels edge must be in it.
    assert any(package_of(t) == "kernels" for t in GRAPH["fastlm.ops.attention"])
    lazy = [
        (m, t)
        for m, p in ((module_name(p), p) for p in source_files())
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef)
        for inner in ast.walk(node)
        if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("fastlm.")
        for t in [inner.module]
    ]
    assert lazy, "no import inside a function found: the walk misses lazy imports"
    module, target = lazy[0]
    assert any(t == target or t.startswith(target + ".") for t in GRAPH[module]) or any(
        target.startswith(t) for t in GRAPH[module]
    ), (module, target, GRAPH[module])
