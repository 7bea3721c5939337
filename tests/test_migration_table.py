"""docs/migrating-from-opacus.md's name table, checked against the real signatures of Opacus and of dpkit.

Opacus's signatures are facts copied from opacus 1.5.2 (``privacy_engine.py``, ``utils/batch_memory_manager.py``);
dpkit never imports Opacus. Every Opacus argument is either a dpkit argument of the same name and meaning, or has a
row in the table and a "did you mean" hint in ``make_private``'s error; every dpkit name the table gives exists.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import dpkit
from dpkit.engine import PrivateTraining
from dpkit.engine.make import OTHER_NAMES

DOC = Path(__file__).resolve().parents[1] / "docs" / "migrating-from-opacus.md"

OPACUS_MAKE_PRIVATE = ["module", "optimizer", "data_loader", "noise_multiplier", "max_grad_norm", "batch_first",
                       "loss_reduction", "poisson_sampling", "clipping", "noise_generator", "grad_sample_mode"]
OPACUS_WITH_EPSILON = [*OPACUS_MAKE_PRIVATE[:3], "target_epsilon", "target_delta", "epochs",
                       *OPACUS_MAKE_PRIVATE[4:]]
OPACUS_ENGINE = ["accountant", "secure_mode"]
OPACUS_ENGINE_METHODS = ["make_private", "make_private_with_epsilon", "get_epsilon", "save_checkpoint",
                         "load_checkpoint"]
OPACUS_BATCH_MEMORY_MANAGER = ["data_loader", "max_physical_batch_size", "optimizer"]


def table() -> list[tuple[str, str]]:
    text = DOC.read_text()
    section = text.split("## Name by name", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    cells = [tuple(c.strip() for c in row.strip("|").split(" | ")) for row in rows[1:]]  # the header row dropped
    assert cells and all(len(c) == 2 for c in cells), cells
    return cells


def code(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def make_private_args() -> set[str]:
    return set(inspect.signature(dpkit.make_private).parameters) - {"unknown"}


@pytest.mark.parametrize("name", sorted(set(OPACUS_MAKE_PRIVATE + OPACUS_WITH_EPSILON + OPACUS_ENGINE)))
def test_every_opacus_argument_is_dpkits_or_in_the_table_and_the_error(name):
    if name in make_private_args():
        return
    opacus_side = " ".join(o for o, _ in table())
    assert f"{name}=" in opacus_side, f"Opacus's {name}= has no row in {DOC.name}'s table"
    assert name in OTHER_NAMES, f"make_private(..., {name}=...) would not say what dpkit calls it"


@pytest.mark.parametrize("method", OPACUS_ENGINE_METHODS)
def test_every_opacus_engine_method_has_a_row(method):
    assert any(f"{method}(" in o or f".{method}" in o for o, _ in table()), method


def test_batch_memory_manager_row_matches_both_signatures():
    [(opacus, ours)] = [(o, d) for o, d in table() if o.startswith("`BatchMemoryManager(")]
    assert re.findall(r"(\w+)=", opacus) == OPACUS_BATCH_MEMORY_MANAGER
    parameters = list(inspect.signature(dpkit.BatchMemoryManager).parameters)
    assert parameters[0] == "private" and set(re.findall(r"(\w+)=", ours)) <= set(parameters)


def test_every_dpkit_name_in_the_table_exists():
    for _, ours in table():
        for snippet in code(ours):
            for dotted, args in re.findall(r"(dpkit(?:\.\w+)+)(?:\(([^)]*)\))?", snippet):
                target = dpkit
                for part in dotted.split(".")[1:]:
                    target = getattr(target, part)  # AttributeError names a name that is not there
                if args and callable(target):
                    assert set(re.findall(r"(\w+)=", args)) <= set(inspect.signature(target).parameters), snippet
            for attr in re.findall(r"private\.(\w+)", snippet):
                assert hasattr(PrivateTraining, attr) or attr in ("ledger", "steps", "criterion"), snippet
            if not snippet.startswith(("dpkit", "private", "@")):
                for arg in re.findall(r"^(\w+)=", snippet):
                    assert arg in make_private_args(), f"{snippet}: make_private has no {arg}="


def test_every_hint_names_a_real_argument_or_says_what_instead():
    for wrong, right in OTHER_NAMES.items():
        assert wrong not in make_private_args()
        assert right in make_private_args() or " " in right or right.startswith("dpkit."), (wrong, right)
