"""The package layering, checked by parsing every import (module-level and inside functions):

    dpalign (primitives) <- accounting (math: no torch, no Ray) <- trainers, controller, cluster <- launch (CLI)

Components never import the launcher; the primitives import nothing of the project; the accounting math imports
neither torch, Ray nor any layer above it. A later change that reintroduces an upward import fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("dpalign", "accounting", "trainers", "controller", "cluster", "launch")


def _imports(package: str) -> list[tuple[str, str]]:
    """(file, imported top-level module) for every import in every file of ``package``."""
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out += [(str(path.relative_to(ROOT)), alias.name.split(".")[0]) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((str(path.relative_to(ROOT)), node.module.split(".")[0]))
    return out


@pytest.mark.parametrize("package", ["accounting", "trainers", "controller", "cluster", "dpalign"])
def test_components_never_import_the_launcher(package):
    bad = [(f, m) for f, m in _imports(package) if m == "launch"]
    assert not bad, f"upward imports into launch/: {bad}"


def test_primitives_import_nothing_of_the_project():
    bad = [(f, m) for f, m in _imports("dpalign") if m in PROJECT and m != "dpalign"]
    assert not bad, bad


def test_accounting_imports_no_torch_no_ray_and_no_layer_above():
    allowed = {"accounting", "dpalign"}
    bad = [(f, m) for f, m in _imports("accounting") if m in ("torch", "ray") or (m in PROJECT and m not in allowed)]
    assert not bad, bad


LAYERS = ("dpalign", "accounting", "cluster", "trainers", "controller", "launch")
"""Bottom to top: a package imports only packages to its left (and itself). Ray plumbing (cluster) sits below
the recipes that use it; the controller builds on the engine's policy types; the launcher wires them together
(it hands the controller to the stages as ``StageContext.policy_factory``)."""


def _module_graph() -> dict[str, set[str]]:
    """Project module -> project modules it imports (anywhere in the file, also inside functions)."""
    files = {}
    for package in PROJECT:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                found = resolve(target) if target.split(".")[0] in PROJECT else None
                # a package's own submodules importing its __init__ is not an edge of the design
                if found and found != module and not module.startswith(found + "."):
                    graph[module].add(found)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
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
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_import_cycle_between_files():
    assert _cycles(_module_graph()) == []


def test_packages_import_only_downward():
    bad = []
    for module, deps in _module_graph().items():
        mine = LAYERS.index(module.split(".")[0])
        bad += [(module, d) for d in deps if LAYERS.index(d.split(".")[0]) > mine]
    assert not bad, f"upward imports (layers, bottom to top: {LAYERS}): {bad}"


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
