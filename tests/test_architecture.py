"""The shape of the tree (ARCHITECTURE.md): imports point down the package graph, no import circles, package
data found through importlib.resources, applications kept out of the packages.

Imports are read from the source with ``ast``, function-local ones included, so a lazy import that goes the
wrong way counts as much as a top-level one.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "train", "export", "store", "adapters")
APPLICATIONS = ("experiments", "benchmarks", "examples")
#: what each package may import besides itself: only packages below it (core <- train <- export; core <- store;
#: core <- adapters). Applications sit on top and may import every package, but no other application.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "train": {"core"},
    "export": {"core", "train"},
    "store": {"core"},
    "adapters": {"core"},
    **{app: set(PACKAGES) for app in APPLICATIONS},
}


def _source_roots() -> dict[str, Path]:
    roots = {name: ROOT / "packages" / f"dv365-{name}" / "src" for name in PACKAGES}
    roots.update({name: ROOT / name / "src" for name in APPLICATIONS})
    return roots


def _modules() -> dict[str, Path]:
    """``dv365.x.y`` -> file, for every module of every package and application."""
    out: dict[str, Path] = {}
    for src in _source_roots().values():
        for f in src.rglob("*.py"):
            parts = f.relative_to(src).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The dv365 modules that ``name`` imports anywhere in its body (``from pkg import submodule`` included)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _component(module: str) -> str:
    return module.split(".")[1]


def test_every_package_and_application_is_scanned() -> None:
    found = {_component(m) for m in _modules()}
    assert found == set(PACKAGES) | set(APPLICATIONS)


def test_imports_point_down_the_package_graph() -> None:
    wrong = defaultdict(list)
    for module, targets in _graph().items():
        src = _component(module)
        for t in sorted(targets):
            dst = _component(t)
            if dst != src and dst not in ALLOWED[src]:
                wrong[f"dv365-{src} -> dv365-{dst}"].append(f"{module} imports {t}")
    assert not wrong, dict(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles() -> None:
    assert _cycles(_graph()) == []


@pytest.mark.parametrize("name", PACKAGES)
def test_packages_find_their_files_without_parent_paths(name: str) -> None:
    src = ROOT / "packages" / f"dv365-{name}" / "src"
    offenders = [
        f"{f.relative_to(ROOT)}:{i}"
        for f in src.rglob("*.py")
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if "parents[" in line
    ]
    assert not offenders, "use importlib.resources (dv365.core.config.shipped_file) for package data"


def test_applications_are_not_inside_the_packages() -> None:
    for name in PACKAGES:
        src = ROOT / "packages" / f"dv365-{name}" / "src" / "dv365" / name
        assert not list(src.rglob("bench*.py")), f"benchmarks belong in benchmarks/, found in dv365-{name}"
        assert not list(src.rglob("demo*.py")), f"the demo belongs in examples/, found in dv365-{name}"
        assert not (src / "experiments").exists() and not list(src.rglob("eval_*.py")), (
            f"experiments belong in experiments/, found in dv365-{name}"
        )
