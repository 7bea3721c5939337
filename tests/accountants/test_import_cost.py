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


def test_a_first_query_imports_no_scipy():
    # scipy.special and scipy.fft cost the first query ~0.5 s of its 0.85 s (issue 23.3).
    code = ("import sys, dpkit; dpkit.get_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=1e-5); "
            "print(sorted({m.split('.')[0] + '.' + m.split('.')[1] for m in sys.modules if m.startswith('scipy.')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=BUILTINS).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("extended", [False, True])
def test_numpys_fft_convolves_exactly_enough(extended):
    from scipy import fft

    rng = np.random.default_rng(0)
    a = _pld.Pmf(0, 0.01, rng.random(1000) / 500)
    b = _pld.Pmf(-10, 0.01, rng.random(777) / 400)
    n = len(a.probs) + len(b.probs) - 1
    assert _pld._fast_length(n) == fft.next_fast_len(n, real=True)  # the length scipy chose: the same floats' grid
    got = _pld.convolve(a, b, extended)
    exact = np.convolve(a.probs, b.probs)
    offset = got.start - (a.start + b.start)
    np.testing.assert_allclose(got.probs, exact[offset:offset + len(got.probs)], rtol=1e-9, atol=1e-15)


def test_the_written_out_gauss_legendre_rule_is_numpys():
    nodes, weights = np.polynomial.legendre.leggauss(8)
    assert np.array_equal(_pld._GL_NODES, nodes) and np.array_equal(_pld._GL_WEIGHTS, weights)


def test_loading_the_plugins_imports_no_numpy_polynomial_or_statistics():
    code = ("import sys; from dpkit import registry; registry.plugin_manager(); "
            "print(sorted(m for m in sys.modules if m.startswith(('numpy.polynomial', 'statistics'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=BUILTINS).stdout
    assert out.strip() == "[]"
