"""Smoke tests of contrib/examples: each script runs with ``--quick`` in a subprocess and prints a sane summary.

``--quick`` trains for a few steps only, so the thresholds are loose (better than chance, privacy within the
target); they fail when a script breaks, when dpkit overspends epsilon, or when training does not learn at all.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "contrib" / "examples"
TARGET_EPSILON = 3.0  # the examples' default target


def run_example(script: str, *args: str) -> dict[str, str]:
    """Run ``script --quick *args`` with one thread; its ``summary:`` line as a dict of ``key=value`` pairs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--quick", *args], check=False,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("summary: ")]
    assert len(summaries) == 1, f"{script} printed {len(summaries)} summary lines:\n{proc.stdout[-2000:]}"
    return dict(item.split("=", 1) for item in summaries[0].removeprefix("summary: ").split())


def check_privacy(summary: dict[str, str]) -> None:
    epsilon = float(summary["epsilon"])
    assert math.isfinite(epsilon) and 0 < epsilon <= TARGET_EPSILON + 0.01, summary
    assert float(summary["delta"]) == 1e-5, summary


def test_augmented_convnet() -> None:
    summary = run_example("augmented_convnet.py")
    check_privacy(summary)
    assert summary["K"] == "4"
    assert float(summary["test_accuracy"]) > 0.3, summary  # 10 classes: chance is 0.1


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_language_model(mode: str) -> None:
    summary = run_example("language_model.py", "--mode", mode)
    check_privacy(summary)
    assert summary["mode"] == mode
    # An untrained model is near uniform over 256 bytes (perplexity ~256).
    assert math.exp(float(summary["val_loss"])) == pytest.approx(float(summary["val_perplexity"]), rel=1e-2)
    assert float(summary["val_perplexity"]) < 60, summary
    assert float(summary["train_loss"]) < 4.5, summary


def test_lora_finetune() -> None:
    summary = run_example("lora_finetune.py")
    check_privacy(summary)
    assert summary["only_adapters"] == "True", summary
    assert summary["adapters_updated"] == "True", summary
    assert summary["frozen_unchanged"] == "True", summary
    assert float(summary["accuracy_before"]) < 0.1, summary  # the base model never saw classes 5-9
    assert float(summary["accuracy_after"]) > 0.4, summary  # 5 classes: chance is 0.2
