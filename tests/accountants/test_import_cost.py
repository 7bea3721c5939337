"""The accountants cost nothing until asked: plugin loading imports no scipy, and the first query imports no
scipy.signal, without changing a single float of their answers."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import signal

from dpkit.accountants import _pld

BUILTINS = {**os.environ, "DPKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}  # what installed plugins import is theirs


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 5000])
def test_decayed_sums_are_lfilters_floats(n):
    rng = np.random.default_rng(n)
    x = rng.random(n) * np.logspace(-300, 0, n)  # tiny and subnormal masses too
    for decay in (0.5, np.exp(-1e-4), np.exp(-3.0)):
        assert np.array_equal(_pld.decayed_sums(x, decay), signal.lfilter([decay], [1.0, -decay], x))


def test_long_grids_use_lfilter(monkeypatch):
    monkeypatch.setattr(_pld, "LFILTER_FROM", 4)
    x = np.arange(10.0)
    assert np.array_equal(_pld.decayed_sums(x, 0.9), signal.lfilter([0.9], [1.0, -0.9], x))


def test_loading_the_plugins_imports_no_scipy():
    """make_private, `dpkit plugins` and every accounting call build the plugin manager: it loads every
    built-in accountant and noise plugin, which used to import scipy.signal, .special and .optimize (~0.6 s)."""
    code = ("import sys; from dpkit import registry, accounting; registry.plugin_manager(); "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in (['scipy', 'signal'], ['scipy', 'special'],"
            " ['scipy', 'optimize'], ['scipy', 'stats'])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=BUILTINS).stdout
    assert out.strip() == "[]"


def test_a_first_query_imports_no_scipy_signal():
    code = ("import sys, dpkit; dpkit.get_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=1e-5); "
            "print('scipy.signal' in sys.modules, 'scipy.optimize' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=BUILTINS).stdout
    assert out.split() == ["False", "False"]
