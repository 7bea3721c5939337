"""Installed, the package is found through its entry point (the datasette "is installed" test)."""
from __future__ import annotations

import contextlib
import io
import json

import torch

import dpkit_example_layer
from dpkit import cli, registry
from dpkit.testing import check_grad_sampler, check_norm_sampler
from dpkit_example_layer import ScaledLinear


def test_entry_point_provides_both_samplers():
    for hook, fn in [("dpkit_grad_samplers", dpkit_example_layer.grad_sampler),
                     ("dpkit_norm_samplers", dpkit_example_layer.norm_sampler)]:
        entry = registry.table(hook)[ScaledLinear]
        assert (entry.value, entry.provider) == (fn, "example_layer")


def test_checks_resolve_the_installed_samplers():
    check_grad_sampler(ScaledLinear(4, 2), torch.randn(3, 4), K=2)  # no sampler=: the registry's
    check_norm_sampler(ScaledLinear(4, 2), torch.randn(3, 4), K=2)


def test_dpkit_plugins_lists_it():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["plugins", "--json"]) == 0
    report = json.loads(out.getvalue())
    entry = next(p for p in report["plugins"] if p["name"] == "example_layer")
    assert entry["version"] == f"dpkit-example-layer {dpkit_example_layer.__version__}"
    assert "dpkit_example_layer.ScaledLinear" in report["modes"]["hooks"]
    assert "dpkit_example_layer.ScaledLinear" in report["modes"]["ghost"]
