"""The mutation suite (tools/mutate.py) still applies to the code, and every mutation names existing tests.

The suite itself runs with `make mutate` (minutes); this check keeps it from rotting silently when the privacy
core's lines move: a mutation whose text is gone would otherwise stop the run, or test nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _mutate_module():
    spec = importlib.util.spec_from_file_location("dpalign_mutate", ROOT / "tools" / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_every_mutation_applies_once_and_names_existing_tests():
    mutate = _mutate_module()
    names = [m.name for m in mutate.MUTATIONS]
    assert len(names) == len(set(names)) and len(names) >= 20
    for m in mutate.MUTATIONS:
        for rel, old, new in m.edits:
            assert old != new
            assert (ROOT / rel).read_text().count(old) == 1, f"{m.name}: {rel} no longer has the mutated text once"
        for test in m.tests:
            path, _, name = test.partition("::")
            text = (ROOT / path).read_text()
            assert not name or f"def {name}(" in text, f"{m.name}: {test} does not exist"
