"""Every ```python block of README.md and docs/*.md runs as written, so a newcomer's first paste works.

A page's blocks run in order in one namespace, as a reader pastes them into one session. A block is skipped
when the line before it is ``<!-- not run: why -->`` (a deliberate fragment) or ``<!-- from path -->`` (an
excerpt of a tested file, kept verbatim by tests/test_meta.py). Every page of docs/ is picked up.
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from dpkit import registry

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)```python\s*$")
SKIP = re.compile(r"^\s*<!-- (not run|from )")
# Pages this suite may not edit, whose fragments are reported to their owners; strict: fixed means remove.
def snippets(page: Path) -> list[tuple[int, str]]:
    """(line number, dedented code) of each ```python block that is meant to run."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        before = next((line for line in reversed(lines[:i]) if line.strip()), "")
        if not SKIP.match(before):
            out.append((i + 2, textwrap.dedent("\n".join(lines[i + 1:end]))))
        i = end + 1
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_snippets_run(page: Path, tmp_path, monkeypatch) -> None:
    blocks = snippets(page)
    if not blocks:
        pytest.skip(f"{page.name} has no python block to run")
    # The plugin tutorial imports the package it builds; `make test` installs plugins after the core tests.
    monkeypatch.syspath_prepend(str(ROOT / "plugins" / "dpkit-example-layer" / "src"))
    monkeypatch.chdir(tmp_path)  # a snippet that writes a file writes it here
    registry.reset()  # a snippet's registrations must not leak into other tests
    namespace: dict = {"__name__": "__snippet__"}
    try:
        for line, code in blocks:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
    finally:
        registry.reset()
