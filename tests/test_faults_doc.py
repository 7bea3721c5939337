"""docs/faults.md names a test for each fault it says is tested: each named test file and test exists."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "faults.md"


def _defined_tests() -> set[str]:
    names = set()
    for path in [*ROOT.glob("tests/**/*.py"), *ROOT.glob("plugins/*/tests/**/*.py")]:
        names.update(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    return names


def test_every_test_the_fault_matrix_names_exists():
    defined = _defined_tests()
    cited = 0
    for cell in re.findall(r"`([^`]*(?:tests/|test_)[^`]*)`", DOC.read_text()):
        path, _, name = cell.partition("::")
        if path.endswith(".py") or "/" in path:
            assert (ROOT / path).exists(), f"docs/faults.md cites {path}, which does not exist"
            name = name or ""
        else:
            name = path
        if name:
            assert name in defined, f"docs/faults.md cites {name}, which no test defines"
        cited += 1
    assert cited >= 15
