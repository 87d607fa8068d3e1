"""The test suite's own honesty rules, checked on the source (AST) of every test module.

Why: a test that cannot fail, or a failure turned into an expected one, proves nothing and looks like coverage.
Two rules here: no test is marked or turned into an expected failure (``xfail``: fix it or let it fail), and every
test function asserts something: an ``assert`` statement, ``pytest.raises``/``warns``/``fail``, a call of an
``assert*`` function (``torch.testing.assert_close``, a helper named so), or a call of a module-level helper of
its own module that does one of these.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ASSERTING_CALLS = {"raises", "warns", "fail"}


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), filename=str(p))) for p in sorted(TESTS.rglob("*.py"))]


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _asserts(fn: ast.AST, helpers: set[str]) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            name = _call_name(node)
            if name.startswith("assert") or name in ASSERTING_CALLS or name in helpers:
                return True
    return False


def _asserting_helpers(tree: ast.Module) -> set[str]:
    """Module-level functions that assert, directly or through each other (a fixed point)."""
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("test")}
    found: set[str] = set()
    while True:
        more = {name for name, fn in functions.items() if name not in found and _asserts(fn, found)}
        if not more:
            return found
        found |= more


def test_no_test_is_an_expected_failure():
    hits = [
        f"{path.relative_to(TESTS)}:{node.lineno}"
        for path, tree in _modules()
        for node in ast.walk(tree)
        if (isinstance(node, ast.Attribute) and node.attr == "xfail") or (isinstance(node, ast.Name) and node.id == "xfail")
    ]
    assert not hits, f"xfail hides a failure (fix it or let it fail): {hits}"


def test_every_test_asserts_something():
    silent = []
    for path, tree in _modules():
        if not path.name.startswith("test_"):
            continue
        helpers = _asserting_helpers(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test") and not _asserts(node, helpers):
                silent.append(f"{path.relative_to(TESTS)}::{node.name}")
    assert not silent, f"tests without an assertion that can fail: {silent}"


def test_the_rules_catch_what_they_forbid():
    """The checks above are not vacuous: they flag a silent test and an xfail, and accept a helper's assert."""
    tree = ast.parse(
        "import pytest\n"
        "def check(x):\n    assert x\n"
        "def test_silent():\n    run()\n"
        "def test_via_helper():\n    check(1)\n"
        "def test_hidden():\n    pytest.xfail('flaky')\n"
    )
    helpers = _asserting_helpers(tree)
    tests = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test")}
    assert helpers == {"check"}
    assert not _asserts(tests["test_silent"], helpers) and _asserts(tests["test_via_helper"], helpers)
    assert any(isinstance(n, ast.Attribute) and n.attr == "xfail" for n in ast.walk(tests["test_hidden"]))
