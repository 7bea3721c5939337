"""Installed, the package is found through its entry point; dpkit's core still never imports transformers."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D

import dpkit_transformers
from dpkit import cli, registry


def test_entry_point_provides_conv1d_and_rms_norms():
    for hook in ("dpkit_grad_samplers", "dpkit_norm_samplers"):
        table = registry.table(hook)
        assert table[Conv1D].provider == "transformers"
        assert table[LlamaRMSNorm].provider == "transformers"


def test_dpkit_plugins_lists_it():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["plugins", "--json"]) == 0
    report = json.loads(out.getvalue())
    entry = next(p for p in report["plugins"] if p["name"] == "transformers")
    assert entry["version"] == f"dpkit-transformers {dpkit_transformers.__version__}"
    assert "transformers.pytorch_utils.Conv1D" in report["modes"]["hooks"]


def test_neither_core_nor_plugin_imports_transformers():
    """The plugin's tables name its classes: loading it (every make_private, `dpkit epsilon`) imports nothing heavy."""
    code = ("import sys, dpkit, dpkit.cli; from dpkit import registry; registry.table('dpkit_grad_samplers'); "
            "print(registry.plugin_manager().has_plugin('transformers'), 'transformers' in sys.modules, "
            "'peft' in sys.modules)")
    for switch, plugin in [("DPKIT_DISABLE_PLUGIN_AUTOLOAD", "False"), ("DPKIT_LOAD_PLUGINS", "True")]:
        env = {**os.environ, switch: "1" if plugin == "False" else "dpkit-transformers"}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [plugin, "False", "False"]
