"""``DPKIT_REQUIRE_TIMM=1`` turns a timm that cannot be imported from a skip into a failed run (conftest.py).

Each case runs pytest on ``test_timm.py`` in a child process whose ``timm`` is a stand-in that fails to import the
way timm does beside a torchvision built for another torch. Needs no timm itself.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

TESTS = pathlib.Path(__file__).parent
BROKEN = 'raise RuntimeError("operator torchvision::nms does not exist")\n'


def run_tests(tmp_path: pathlib.Path, require: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "__init__.py").write_text(BROKEN)
    env = {k: v for k, v in os.environ.items() if k != "DPKIT_REQUIRE_TIMM"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    if require is not None:
        env["DPKIT_REQUIRE_TIMM"] = require
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist",
               str(TESTS / "test_timm.py")]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


def test_without_the_variable_a_broken_timm_skips(tmp_path):
    done = run_tests(tmp_path, None)
    assert done.returncode in (0, 5), done.stdout + done.stderr  # 5: the one module skipped whole, nothing run
    assert "1 skipped" in done.stdout and "operator torchvision::nms" in done.stdout, done.stdout


def test_required_timm_that_cannot_be_imported_fails_the_run(tmp_path):
    done = run_tests(tmp_path, "1")
    out = done.stdout + done.stderr
    assert done.returncode not in (0, 5), out  # 5 (nothing collected) would be a skip
    assert "DPKIT_REQUIRE_TIMM=1 but timm cannot be imported (RuntimeError: operator torchvision::nms" in out, out
    assert "passed" not in out and "skipped" not in out, out


def test_a_value_other_than_0_or_1_is_refused(tmp_path):
    done = run_tests(tmp_path, "yes")
    out = done.stdout + done.stderr
    assert done.returncode not in (0, 5), out
    assert "DPKIT_REQUIRE_TIMM='yes': set it to 1" in out, out
