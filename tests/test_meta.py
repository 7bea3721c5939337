"""Meta-tests (the datasette pattern): the hooks, the docs and the built-in plugins stay in step by construction.

A new hookspec without an example or documentation, a built-in module that implements nothing, or a new
built-in layer without an example input here fails a test, rather than waiting for someone to notice.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from dpkit import hookspecs, registry
from dpkit.testing import check_grad_sampler, check_norm_sampler

ROOT = Path(__file__).resolve().parents[1]
SAMPLER_HOOKS = ("dpkit_grad_samplers", "dpkit_norm_samplers")


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_hook_reference", ROOT / "docs" / "gen_hook_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- hookspecs and their documentation ----------------------------------------------------------
def test_spec_names_lists_every_hookspec():
    marked = {name for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, "dpkit_spec")}
    assert marked == set(hookspecs.SPEC_NAMES)
    assert all(name.startswith("dpkit_") for name in marked)


@pytest.mark.parametrize("name", hookspecs.SPEC_NAMES)
def test_hookspec_docstring_has_an_example(name):
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert doc.splitlines()[0].endswith("."), f"{name}: the docstring needs a one-line summary"
    assert "Example::" in doc, f"{name}: the docstring needs an 'Example::' block"
    assert "@dpkit.hookimpl" in doc and f"def {name}(" in doc, f"{name}: the example must implement the hook"


@pytest.mark.parametrize("name", hookspecs.SPEC_NAMES)
def test_hookspec_is_documented_in_plugins_md(name):
    text = (ROOT / "docs" / "plugins.md").read_text()
    signature = _load_generator().signature(getattr(hookspecs, name))
    assert f"### `{name}`" in text and signature in text


def test_hook_reference_is_current():
    rendered = _load_generator().render()
    assert (ROOT / "docs" / "plugins.md").read_text() == rendered, (
        "docs/plugins.md is out of date with dpkit/hookspecs.py: run python docs/gen_hook_reference.py"
    )


def test_tutorial_excerpts_are_the_example_package_verbatim():
    """docs/writing-a-layer-plugin.md quotes plugins/dpkit-example-layer; a quote that drifts fails here."""
    text = (ROOT / "docs" / "writing-a-layer-plugin.md").read_text()
    excerpts = re.findall(r"<!-- from (\S+) -->\n```\w*\n(.*?)```", text, re.S)
    assert len(excerpts) >= 6
    for path, code in excerpts:
        assert code in (ROOT / path).read_text(), f"the tutorial's excerpt of {path} is not in that file:\n{code}"


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_docs_relative_links_resolve(page):
    text = (ROOT / "docs" / page).read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / "docs" / target).exists(), f"docs/{page} links to {target}, which does not exist"


# -- built-in plugins ---------------------------------------------------------------------------
def _hookimpls(module) -> dict[str, object]:
    """The module's ``@hookimpl`` functions by the hook they implement."""
    out = {}
    for attr, fn in vars(module).items():
        opts = getattr(fn, "dpkit_impl", None)
        if opts is not None:
            out[opts.get("specname") or attr] = fn
    return out


@pytest.mark.parametrize("name", registry.BUILTIN_PLUGINS)
def test_builtin_plugin_implements_a_hook(name):
    impls = _hookimpls(importlib.import_module(name))
    assert impls, f"{name} is in BUILTIN_PLUGINS but implements no dpkit hook"
    assert set(impls) <= set(hookspecs.SPEC_NAMES), f"{name} implements unknown hooks {set(impls)}"


def _builtin_samplers() -> list[tuple[str, type, str]]:
    """(hook, layer type, provider) for every built-in sampler, read from the modules as the registry merges them.

    Read at collection time without building the registry, so installed plugins cannot add or hide entries.
    """
    merged: dict[tuple[str, type], str] = {}
    for name in registry.BUILTIN_PLUGINS:
        impls = _hookimpls(importlib.import_module(name))
        for hook in SAMPLER_HOOKS:
            if hook in impls:
                merged.update({(hook, t): name for t in impls[hook]()})
    return [(hook, t, provider) for (hook, t), provider in merged.items()]


def _bag_input(rows: int):
    return torch.randint(0, 6, (rows, 3)), None


# An example for every built-in layer type: (layer factory, example input, check keyword arguments).
EXAMPLES: dict[type, tuple] = {
    nn.Linear: (lambda: nn.Linear(4, 3), torch.randn(2, 5, 4), {}),
    nn.Conv1d: (lambda: nn.Conv1d(2, 3, 3, padding=1), torch.randn(2, 2, 6), {}),
    nn.Conv2d: (lambda: nn.Conv2d(2, 3, 3, stride=2, groups=1), torch.randn(2, 2, 5, 5), {}),
    nn.Conv3d: (lambda: nn.Conv3d(2, 2, 2), torch.randn(2, 2, 3, 3, 3), {}),
    nn.Embedding: (lambda: nn.Embedding(6, 3, padding_idx=0), torch.tensor([[0, 5, 2]]), {}),
    nn.EmbeddingBag: (lambda: nn.EmbeddingBag(6, 3, mode="mean"), _bag_input, {}),
    nn.LayerNorm: (lambda: nn.LayerNorm(4), torch.randn(2, 3, 4), {}),
    nn.GroupNorm: (lambda: nn.GroupNorm(2, 4), torch.randn(2, 4, 3), {}),
    nn.InstanceNorm1d: (lambda: nn.InstanceNorm1d(3, affine=True), torch.randn(2, 3, 5), {"batch_sizes": (1, 3)}),
    nn.InstanceNorm2d: (lambda: nn.InstanceNorm2d(3, affine=True), torch.randn(2, 3, 3, 3), {"batch_sizes": (1, 3)}),
    nn.InstanceNorm3d: (lambda: nn.InstanceNorm3d(2, affine=True), torch.randn(2, 2, 2, 3, 2), {"batch_sizes": (1, 2)}),
    nn.RMSNorm: (lambda: nn.RMSNorm(4), torch.randn(2, 3, 4), {}),
    nn.RNN: (lambda: nn.RNN(3, 4, num_layers=2, bidirectional=True, batch_first=True), torch.randn(2, 5, 3), {}),
    nn.GRU: (lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True), torch.randn(2, 5, 3), {}),
    nn.LSTM: (lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True, proj_size=2),
              torch.randn(2, 5, 3), {}),
    nn.MultiheadAttention: (lambda: nn.MultiheadAttention(4, 2, batch_first=True, add_bias_kv=True),
                            (torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4)), {}),
}


@pytest.fixture
def builtin_registry(fresh_registry):
    """The built-ins only (the root conftest's fresh registry; one torch thread is autouse there)."""
    return fresh_registry


@pytest.mark.parametrize("hook, layer_type, provider",
                         [pytest.param(*row, id=f"{row[0][6:-1]}-{row[1].__name__}") for row in _builtin_samplers()])
def test_builtin_sampler_agrees_with_torch_func(builtin_registry, hook, layer_type, provider):
    assert layer_type in EXAMPLES, (
        f"{layer_type.__qualname__} has a built-in {hook[6:-1]} but no example input: add one to EXAMPLES in {__file__}"
    )
    assert registry.table(hook)[layer_type].provider == provider
    make, example, kwargs = EXAMPLES[layer_type]
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()  # not the identity init of norm layers, which would hide a wrong formula
    assert type(layer) is layer_type
    check = check_grad_sampler if hook == "dpkit_grad_samplers" else check_norm_sampler
    check(layer, example, K=2, **kwargs)  # the sampler the registry resolves for this exact type


def test_examples_hold_no_stale_layer_types():
    covered = {t for _, t, _ in _builtin_samplers()}
    assert set(EXAMPLES) <= covered, f"EXAMPLES has types no built-in covers: {set(EXAMPLES) - covered}"


def test_every_builtin_layer_has_both_samplers():
    """ghost and bk clip from norms: a built-in layer with only a grad sampler would be a silent slow path."""
    rows = _builtin_samplers()
    grads = {t for h, t, _ in rows if h == "dpkit_grad_samplers"}
    norms = {t for h, t, _ in rows if h == "dpkit_norm_samplers"}
    assert grads == norms


# -- the package's surface: names, version, what importing it costs ------------------------------
def test_every_public_name_resolves_and_dir_lists_it():
    import dpkit

    listed = dir(dpkit)
    for name in dpkit.__all__:
        assert getattr(dpkit, name) is not None and name in listed
    for name in ("get_epsilon", "get_noise_multiplier", "testing", "audit", "accounting", "__version__"):
        assert name in listed
    assert callable(dpkit.fix) and dpkit.testing.check_grad_sampler and dpkit.audit.CanaryAudit
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        dpkit.nothing


def test_version_is_the_distributions():
    import dpkit
    from importlib import metadata

    assert dpkit.__version__ == metadata.version("dpkit")
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", dpkit.__version__)


def test_importing_dpkit_leaves_the_engine_for_first_use():
    """`import dpkit` cost 1.8x `import torch`: the engine's hooks imported torch's compiler stack eagerly.
    The engine (and audit, testing, scipy) load on first use; make_private still resolves from the package."""
    import subprocess
    import sys

    code = ("import sys, dpkit; print(sorted({'dpkit.engine', 'dpkit.audit', 'dpkit.testing', 'torch._dynamo', "
            "'scipy.special', 'scipy.signal'} & set(sys.modules))); from dpkit import make_private; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "ok"]


def _load_api_generator():
    spec = importlib.util.spec_from_file_location("gen_api_reference", ROOT / "docs" / "gen_api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_md_is_current():
    rendered = _load_api_generator().render()
    assert (ROOT / "docs" / "api.md").read_text(encoding="utf-8") == rendered, (
        "docs/api.md is out of date with the docstrings: run python docs/gen_api_reference.py")


def test_api_md_documents_every_public_name():
    import dpkit

    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    for name in dpkit.__all__ + ["testing.check_sensitivity", "accounting.get_epsilon", "audit.CanaryAudit"]:
        assert f"### `dpkit.{name}`" in text, name
    assert "#### `PrivateTraining.privacy_report`" in text
