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
