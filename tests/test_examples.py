"""Smoke tests of contrib/examples: each script runs with ``--quick`` in a subprocess and prints a sane summary.

``--quick`` trains for a few steps only, so the thresholds are loose (better than chance, privacy within the
target); they fail when a script breaks, when dpkit overspends epsilon, or when training does not learn at all.
The numbers contrib/examples/README.md quotes come from the scripts' default runs, which take minutes:
``DPKIT_EXAMPLE_RESULTS=1 pytest tests/test_examples.py -k readme`` reruns them and compares.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "contrib" / "examples"
TARGET_EPSILON = 3.0  # the examples' default target


def run_example(script: str, *args: str, quick: bool = True) -> dict[str, str]:
    """Run ``script [--quick] *args`` with one thread; its ``summary:`` line as a dict of ``key=value`` pairs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    argv = [sys.executable, str(EXAMPLES / script), *(["--quick"] if quick else []), *args]
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, timeout=300 if quick else 1800)
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


def test_bandmf_vs_dpsgd() -> None:
    """The three mechanisms on the demo task for 20 steps: each calibrated to the target and learning."""
    summary = run_example("bandmf_vs_dpsgd.py")
    check_privacy(summary)
    for mechanism in ("dpsgd", "bandmf", "tree"):
        assert float(summary[f"demo_{mechanism}"]) > 0.3, summary  # 10 classes: chance is 0.1


def test_correlated_noise_lm() -> None:
    """The three mechanisms on the small LM for a few steps: each calibrated to the target, none diverging."""
    summary = run_example("correlated_noise_lm.py")
    check_privacy(summary)
    for mechanism in ("dpsgd", "bandmf", "tree"):
        assert float(summary[mechanism]) < math.log(256), summary  # below the uniform model's loss


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


def test_digits_clipping_over_seeds() -> None:
    """digits.py's ``--clipping``/``--seeds``: the per-layer row of contrib/benchmarks/RESULTS.md comes from it."""
    summary = run_example("digits.py", "--clipping", "per_layer", "--seeds", "1", quick=False)
    check_privacy(summary)
    assert summary["clipping"] == "per_layer" and summary["seeds"] == "1", summary
    assert float(summary["mean_accuracy"]) > 0.3, summary  # 10 classes: chance is 0.1


def test_digits_demo_spends_its_target_without_matplotlib_or_a_loss_display() -> None:
    """`make demo`: the plot is optional, the noise is calibrated for the steps taken (169 of a calibration for
    180 left epsilon at 2.89 of 3), and the progress bar shows epsilon, not the private batch's loss."""
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "  # import matplotlib raises ImportError
            f"sys.argv = ['digits.py', '--sweep', '8', '--out', 'unused.png']; "
            f"runpy.run_path({str(EXAMPLES / 'digits.py')!r}, run_name='__main__')")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no plot: matplotlib is not installed" in proc.stdout and "privacy-utility plot" not in proc.stdout
    [summary] = [line for line in proc.stdout.splitlines() if line.startswith("summary: ")]
    epsilon = float(dict(kv.split("=") for kv in summary.split()[1:])["epsilon"])
    assert TARGET_EPSILON * 0.99 <= epsilon <= TARGET_EPSILON + 0.01, summary
    assert "eps=" in proc.stderr and "loss=" not in proc.stderr  # tqdm's postfix


def test_author_level_lm() -> None:
    summary = run_example("author_level_lm.py")
    assert summary["unit"] == "author" and 0 < float(summary["epsilon"]) <= 8.0, summary
    assert float(summary["val_loss"]) < float(summary["untrained_loss"]), summary  # held-out authors


# What the README's table quotes for each default run: (script, its extra arguments, {summary key: pattern in the
# script's row}). Seed 0 on one thread repeats itself; a change to dpkit's noise stream moves the numbers by about
# the seed-to-seed spread (a point of accuracy), hence the tolerances.
README_RESULTS = [
    ("digits.py", ["--sweep", ""], {"test_accuracy": r"test accuracy ([\d.]+)% at"}),
    ("augmented_convnet.py", [], {"test_accuracy": r"K=4: test accuracy ([\d.]+)"}),
    ("language_model.py", [], {"val_perplexity": r"validation perplexity ([\d.]+)"}),
    ("lora_finetune.py", [], {"accuracy_before": r"([\d.]+) before", "accuracy_after": r"([\d.]+) after"}),
]


def readme_row(script: str) -> str:
    text = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    return next(line for line in text.splitlines() if line.startswith(f"| `{script}`"))


@pytest.mark.parametrize("script, args, quoted", README_RESULTS, ids=[r[0] for r in README_RESULTS])
def test_readme_quotes_are_in_the_table(script: str, args: list[str], quoted: dict[str, str]) -> None:
    """The patterns below find their numbers, so the slow check cannot pass by finding nothing."""
    for pattern in quoted.values():
        assert re.search(pattern, readme_row(script)), (script, pattern)


@pytest.mark.skipif(not os.environ.get("DPKIT_EXAMPLE_RESULTS"), reason="default runs take minutes: set "
                    "DPKIT_EXAMPLE_RESULTS=1 to compare contrib/examples/README.md with what the scripts print")
@pytest.mark.parametrize("script, args, quoted", README_RESULTS, ids=[r[0] for r in README_RESULTS])
def test_readme_numbers_are_what_the_default_runs_print(script: str, args: list[str], quoted: dict[str, str]
                                                        ) -> None:
    summary = run_example(script, *args, quick=False)
    check_privacy(summary)
    for key, pattern in quoted.items():
        shown = float(re.search(pattern, readme_row(script)).group(1))
        printed = float(summary[key])
        if "%" in pattern:
            printed *= 100
        tolerance = 0.1 * printed if "perplexity" in key else (1.5 if "%" in pattern else 0.015)
        assert shown == pytest.approx(printed, abs=tolerance), f"{script}: README says {shown}, the run printed " \
                                                               f"{printed}: update contrib/examples/README.md"
