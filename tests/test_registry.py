"""The plugin registry, tested as pluggy tests its manager: a fresh registry per test, fake distributions.

Covers the registration order (built-in < entry point < decorator, newest wins, provider recorded), entry-point
loading and its environment switches, validation of hook names and tables, laziness at import, and one real
installed package (``tests/fixtures/dpkit_fake_plugin``) found through its metadata.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import dpkit
from dpkit import registry
from dpkit.errors import PluginError
from dpkit.plan import build_plan

FIXTURE = Path(__file__).parent / "fixtures" / "dpkit_fake_plugin"
GRAD = "dpkit_grad_samplers"


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """A registry rebuilt from scratch, without installed plugins unless a test fakes some."""
    monkeypatch.setenv("DPKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("DPKIT_LOAD_PLUGINS", raising=False)
    registry.reset()
    yield
    registry.reset()


class FakeDist:
    def __init__(self, name: str, version: str = "1.0"):
        self.name, self.version = name, version


class FakeEntryPoint:
    """What ``importlib.metadata.entry_points(group="dpkit")`` yields: name, value, dist and ``load()``."""

    def __init__(self, name: str, plugin: object, dist: str = "", loads: list | None = None):
        self.name, self.value, self.group = name, f"{name}_module", "dpkit"
        self.dist = FakeDist(dist or f"dpkit-{name}")
        self._plugin, self._loads = plugin, loads

    def load(self):
        if self._loads is not None:
            self._loads.append(self.name)
        if isinstance(self._plugin, BaseException):
            raise self._plugin
        return self._plugin


@pytest.fixture
def entry_points(monkeypatch):
    """Install fake entry points (autoload on); returns the list of names ``load()`` was called for."""
    loads: list[str] = []

    def install(*eps: FakeEntryPoint) -> list[str]:
        for ep in eps:
            ep._loads = loads
        monkeypatch.delenv("DPKIT_DISABLE_PLUGIN_AUTOLOAD")
        monkeypatch.setattr(registry.metadata, "entry_points", lambda group: list(eps) if group == "dpkit" else [])
        registry.reset()
        return loads

    return install


def plugin(name: str, **hooks) -> types.ModuleType:
    """A plugin module whose hooks return the given tables (or raise/return whatever a test needs)."""
    module = types.ModuleType(name)
    for hook, value in hooks.items():
        setattr(module, hook, dpkit.hookimpl(specname=hook)(lambda value=value: value))
    return module


def sampler_a(layer, activations, backprops, K=1):
    return {}


def sampler_b(layer, activations, backprops, K=1):
    return {}


# -- order and provenance -----------------------------------------------------------------------
def test_builtins_are_registered_first_in_tuple_order():
    names = [name for name, _ in registry.plugin_manager().list_name_plugin()]
    assert names == list(registry.BUILTIN_PLUGINS)
    assert registry.table(GRAD)[nn.Linear].provider == "dpkit.layers.linear"


def test_builtin_then_entry_point_then_decorator_newest_wins(entry_points):
    entry_points(FakeEntryPoint("ep", plugin("ep_mod", dpkit_grad_samplers={nn.Linear: sampler_a})))
    entry = registry.table(GRAD)[nn.Linear]
    assert (entry.value, entry.provider) == (sampler_a, "ep")

    assert dpkit.register_grad_sampler(nn.Linear)(sampler_b) is sampler_b  # the decorator returns the function
    entry = registry.table(GRAD)[nn.Linear]
    assert entry.value is sampler_b and entry.provider.startswith(f"user:{__name__}.sampler_b")

    registry.unregister_plugin(entry.provider)
    assert registry.table(GRAD)[nn.Linear].provider == "ep"
    assert registry.table("dpkit_norm_samplers")[nn.Linear].provider == "dpkit.layers.linear"  # untouched


def test_later_entry_point_wins_over_earlier(entry_points):
    entry_points(FakeEntryPoint("one", plugin("m1", dpkit_grad_samplers={nn.Linear: sampler_a})),
                 FakeEntryPoint("two", plugin("m2", dpkit_grad_samplers={nn.Linear: sampler_b})))
    assert registry.table(GRAD)[nn.Linear].provider == "two"


def test_reregistering_the_same_function_replaces_it():
    pm = registry.plugin_manager()
    dpkit.register_grad_sampler(nn.Linear)(sampler_a)
    count = len(pm.get_plugins())
    dpkit.register_grad_sampler(nn.Linear)(sampler_a)
    assert len(pm.get_plugins()) == count

    def rerun(layer, activations, backprops, K=1):  # the same cell run again: a new function, same name
        return {}

    rerun.__module__, rerun.__qualname__ = sampler_a.__module__, sampler_a.__qualname__
    dpkit.register_grad_sampler(nn.Linear)(rerun)
    assert len(pm.get_plugins()) == count
    assert registry.table(GRAD)[nn.Linear].value is rerun


def test_one_decorator_several_types_and_user_version():
    dpkit.register_norm_sampler(nn.Conv1d, nn.Conv2d)(sampler_a)
    table = registry.table("dpkit_norm_samplers")
    assert table[nn.Conv1d].provider == table[nn.Conv2d].provider
    assert table[nn.Conv3d].provider == "dpkit.layers.conv"
    assert registry.plugin_version(table[nn.Conv1d].provider) == "user code"
    assert registry.plugin_version("dpkit.layers.linear").startswith("dpkit")
    with pytest.raises(TypeError, match="at least one layer type"):
        dpkit.register_grad_sampler()


# -- entry points and their switches ------------------------------------------------------------
def test_entry_point_that_fails_to_import_names_it_and_the_opt_out(entry_points):
    entry_points(FakeEntryPoint("broken", ModuleNotFoundError("No module named 'cupy'"), dist="dpkit-broken"))
    with pytest.raises(PluginError) as err:
        registry.plugin_manager()
    message = str(err.value)
    assert "'broken'" in message and "dpkit-broken 1.0" in message and "broken_module" in message
    assert "cupy" in message and "DPKIT_DISABLE_PLUGIN_AUTOLOAD=1" in message


def test_disable_autoload_never_reads_entry_points(monkeypatch):
    def boom(**kwargs):
        raise AssertionError("entry points were read")

    monkeypatch.setattr(registry.metadata, "entry_points", boom)
    assert nn.Linear in registry.table(GRAD)


@pytest.mark.parametrize("only, loaded", [
    ("dpkit-a", ["a"]),          # by distribution name
    ("b", ["b"]),                # by entry-point name
    (" dpkit-a , b ", ["a", "b"]),
    ("", []),                    # none at all
    ("dpkit-c", []),
])
def test_load_plugins_restricts_which_entry_points_load(entry_points, monkeypatch, only, loaded):
    loads = entry_points(FakeEntryPoint("a", plugin("ma", dpkit_grad_samplers={nn.Linear: sampler_a})),
                         FakeEntryPoint("b", plugin("mb", dpkit_norm_samplers={nn.Linear: sampler_b})))
    monkeypatch.setenv("DPKIT_LOAD_PLUGINS", only)
    names = {name for name, _ in registry.plugin_manager().list_name_plugin()}
    assert loads == loaded and names - set(registry.BUILTIN_PLUGINS) == set(loaded)


def test_entry_points_load_lazily_once(entry_points):
    loads = entry_points(FakeEntryPoint("a", plugin("ma", dpkit_grad_samplers={nn.Linear: sampler_a})))
    assert loads == []
    registry.table(GRAD)
    registry.table("dpkit_norm_samplers")
    assert loads == ["a"]


def test_plugin_version_of_an_entry_point(entry_points):
    entry_points(FakeEntryPoint("a", plugin("ma", dpkit_grad_samplers={nn.Linear: sampler_a}), dist="dpkit-a"))
    assert registry.plugin_version("a") == "dpkit-a 1.0"


# -- validation ---------------------------------------------------------------------------------
def test_misspelt_hook_in_an_entry_point_is_refused(entry_points):
    entry_points(FakeEntryPoint("typo", plugin("typo_mod", dpkit_grad_sampler={nn.Linear: sampler_a})))
    with pytest.raises(PluginError, match=r"dpkit_grad_sampler\b.*dpkit hooks are: dpkit_grad_samplers"):
        registry.plugin_manager()


def test_misspelt_hook_in_register_plugin_is_refused():
    with pytest.raises(PluginError, match="dpkit_grad_sampler"):
        registry.register_plugin(plugin("typo_mod", dpkit_grad_sampler={nn.Linear: sampler_a}), name="typo")


def test_hookimpl_with_an_argument_the_spec_lacks_is_refused():
    module = types.ModuleType("extra_arg")

    @dpkit.hookimpl
    def dpkit_grad_samplers(model):
        return {}

    module.dpkit_grad_samplers = dpkit_grad_samplers
    with pytest.raises(PluginError, match=r"(?s)'extra_arg'.*dpkit_grad_samplers.*model"):
        registry.register_plugin(module, name="extra_arg")


def two_arguments(layer, activations):
    return {}


@pytest.mark.parametrize("hook, provided, message", [
    (GRAD, [nn.Linear, sampler_a], "returned from dpkit_grad_samplers a list; it must return a dict"),
    (GRAD, None, "a NoneType; it must return a dict"),
    (GRAD, {"Conv1D": sampler_a}, "key 'Conv1D' (a str); keys must be nn.Module subclasses or their qualified"),
    (GRAD, {"a.b-c.D": sampler_a}, "key 'a.b-c.D' (a str); keys must be nn.Module subclasses"),
    ("dpkit_norm_samplers", {int: sampler_a}, "key <class 'int'> (a type); keys must be nn.Module subclasses"),
    (GRAD, {nn.Linear: two_arguments}, "the sampler for Linear, 'two_arguments', has signature (layer, activations)"),
    (GRAD, {nn.Linear: "sampler_a"}, "the sampler for Linear is 'sampler_a', which is not callable"),
    ("dpkit_clippers", {nn.Linear: sampler_a}, "keys must be names (str)"),
    ("dpkit_accountants", {"mine": 3}, "'mine': 3, which is not callable"),
])
def test_malformed_table_names_plugin_hook_and_entry(hook, provided, message):
    registry.register_plugin(plugin("bad_mod", **{hook: provided}), name="badplugin")
    with pytest.raises(PluginError) as err:
        registry.table(hook)
    assert f"plugin 'badplugin' returned from {hook}" in str(err.value)
    assert message in str(err.value)


def test_decorator_refuses_a_sampler_with_the_wrong_signature():
    with pytest.raises(PluginError, match="must accept \\(layer, activations, backprops, K=1\\)"):
        dpkit.register_grad_sampler(nn.Linear)(two_arguments)
    assert registry.table(GRAD)[nn.Linear].provider == "dpkit.layers.linear"


def test_table_and_lookup_errors():
    with pytest.raises(ValueError, match="'dpkit_on_clip' is not a table hook"):
        registry.table("dpkit_on_clip")
    with pytest.raises(PluginError, match=r"clipping='nope' is not provided by any plugin; installed: \[.*'flat'"):
        registry.lookup("dpkit_clippers", "nope", "clipping")


# -- keys by qualified name ---------------------------------------------------------------------
class Scale(nn.Module):
    """A layer for name keys: module-level, so that its qualified name resolves to it."""


def test_a_name_key_is_exactly_the_class_it_names():
    name = registry.qualified_name(Scale)
    registry.register_plugin(plugin("lazy_mod", dpkit_grad_samplers={name: sampler_a}), name="lazy")
    table = registry.table(GRAD)
    assert table[Scale].provider == "lazy" and table.get(Scale).value is sampler_a and Scale in table
    assert table[name].provider == "lazy"
    key = next(k for k in table if k == name)  # listed by name, labelled like a class
    assert isinstance(key, registry.LayerName) and f"{key.__module__}.{key.__qualname__}" == name
    look_alike = type("Scale", (nn.Module,), {"__module__": Scale.__module__})  # same name, not the class
    assert registry.qualified_name(look_alike) == name and look_alike not in table
    rows = build_plan(nn.Sequential(Scale(), nn.Linear(2, 2)), "hooks")
    assert [(r.name, r.provider) for r in rows] == [("1", "dpkit.layers.linear")]  # Scale owns no parameter
    with_param = nn.Sequential(Scale())
    with_param[0].w = nn.Parameter(torch.ones(2))
    assert [(r.name, r.provider, r.sampler) for r in build_plan(with_param, "hooks")] == [("0", "lazy", sampler_a)]


def test_a_name_key_imports_nothing():
    name = "dpkit_never_imported_package.layers.Thing"
    registry.register_plugin(plugin("lazy_mod", dpkit_norm_samplers={name: sampler_a}), name="lazy")
    table = registry.table("dpkit_norm_samplers")
    assert table[name].provider == "lazy" and nn.Linear in table
    build_plan(nn.Linear(2, 2), "bk")
    assert "dpkit_never_imported_package" not in sys.modules


@pytest.mark.parametrize("first_by_name", [True, False])
def test_newest_wins_between_a_class_and_its_name(first_by_name):
    name = registry.qualified_name(Scale)
    first, second = (name, Scale) if first_by_name else (Scale, name)
    registry.register_plugin(plugin("m1", dpkit_grad_samplers={first: sampler_a}), name="one")
    registry.register_plugin(plugin("m2", dpkit_grad_samplers={second: sampler_b}), name="two")
    table = registry.table(GRAD)
    assert (table[Scale].value, table[Scale].provider, table[name].provider) == (sampler_b, "two", "two")
    assert len([k for k in table if k in (Scale, name)]) == 1


def test_a_name_key_over_a_builtin_is_an_override():
    registry.register_plugin(plugin("m", dpkit_grad_samplers={"torch.nn.modules.linear.Linear": sampler_a}),
                             name="shady")
    assert registry.table(GRAD)[nn.Linear].provider == "shady"
    assert registry.overridden(GRAD, nn.Linear) == ("shady", ["dpkit.layers.linear"])


def test_decorators_take_names():
    dpkit.register_norm_sampler(registry.qualified_name(Scale))(sampler_b)
    assert registry.table("dpkit_norm_samplers")[Scale].value is sampler_b


# -- laziness -----------------------------------------------------------------------------------
def test_importing_dpkit_loads_no_plugin():
    """``import dpkit`` imports no layer plugin and reads no entry point; the first table use does both."""
    code = textwrap.dedent("""
        import json, sys
        from importlib import metadata
        reads = []
        original = metadata.entry_points
        def entry_points(**kw):  # torch reads its own group at import; count dpkit's only
            if kw.get("group") == "dpkit":
                reads.append(kw)
                return []
            return original(**kw)
        metadata.entry_points = entry_points
        import dpkit, dpkit.registry
        dpkit.make_private, dpkit.register_grad_sampler, dpkit.hookimpl
        before = {"linear": "dpkit.layers.linear" in sys.modules, "reads": len(reads),
                  "built": dpkit.registry.plugin_manager.cache_info().currsize}
        dpkit.registry.table("dpkit_grad_samplers")
        after = {"linear": "dpkit.layers.linear" in sys.modules, "reads": len(reads),
                 "built": dpkit.registry.plugin_manager.cache_info().currsize}
        print(json.dumps([before, after]))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPKIT_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    before, after = json.loads(done.stdout)
    assert before == {"linear": False, "reads": 0, "built": 0}
    assert after == {"linear": True, "reads": 1, "built": 1}


# -- a real installed package -------------------------------------------------------------------
@pytest.fixture(scope="module")
def installed_fake_plugin(tmp_path_factory) -> Path:
    """``tests/fixtures/dpkit_fake_plugin`` pip-installed into a temporary folder: offline, no venv change.

    Built from a copy, because setuptools writes ``build/`` and ``*.egg-info`` next to the sources.
    """
    root = tmp_path_factory.mktemp("fake_plugin")
    source, target = root / "src", root / "site"
    shutil.copytree(FIXTURE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    # Offline when the venv's setuptools can build a wheel by itself (>= 70.1, or with `wheel`); a bare
    # venv's bundled setuptools cannot, and then pip fetches a build backend from the package index.
    offline = ["--no-build-isolation", "--no-index"] if _can_build_offline() else []
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *offline,
           "--disable-pip-version-check", "--target", str(target), str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return target


def _can_build_offline() -> bool:
    from importlib import metadata

    try:
        version = tuple(int(part) for part in metadata.version("setuptools").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    if version >= (70, 1):
        return True
    try:
        metadata.version("wheel")
    except metadata.PackageNotFoundError:
        return False
    return version >= (64, 0)


def run_with(site: Path, code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DPKIT_")}
    base.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=base, timeout=120)


def test_installed_package_is_found_through_its_entry_point(installed_fake_plugin):
    """One subprocess (torch imports once): the registry, dpkit.testing, the switches, and ``dpkit plugins``."""
    done = run_with(installed_fake_plugin, """
        import contextlib, io, json, os, torch
        from dpkit import cli, registry
        from dpkit.testing import check_grad_sampler
        import dpkit_fake_plugin as fake

        torch.set_num_threads(1)
        entry = registry.table("dpkit_grad_samplers")[fake.Gain]
        check_grad_sampler(fake.Gain(3), torch.randn(2, 4, 3), K=2)  # resolved through the registry
        seen = {"provider": entry.provider, "value": entry.value is fake.grad_sampler}
        listing = io.StringIO()
        with contextlib.redirect_stdout(listing):
            seen["cli"] = cli.main(["plugins", "--json"])
        seen["listed"] = next(p for p in json.loads(listing.getvalue())["plugins"] if p["name"] == "fake")
        for key, value in [("DPKIT_DISABLE_PLUGIN_AUTOLOAD", "1"), ("DPKIT_LOAD_PLUGINS", ""),
                           ("DPKIT_LOAD_PLUGINS", "dpkit-fake-plugin"), ("DPKIT_LOAD_PLUGINS", "other")]:
            saved = dict(os.environ)
            os.environ.pop("DPKIT_LOAD_PLUGINS")
            os.environ[key] = value
            registry.reset()
            seen[f"{key}={value}"] = fake.Gain in registry.table("dpkit_grad_samplers")
            os.environ.clear()
            os.environ.update(saved)
        print(json.dumps(seen))
    """, DPKIT_LOAD_PLUGINS="fake")  # other installed plugins (dpkit-transformers) would only slow this down
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "provider": "fake", "value": True, "cli": 0,
        "listed": {"name": "fake", "kind": "installed", "version": "dpkit-fake-plugin 0.3.1", "hooks": [GRAD],
                   "provides": {GRAD: [{"key": "dpkit_fake_plugin.Gain", "overridden_by": None}]}},
        "DPKIT_DISABLE_PLUGIN_AUTOLOAD=1": False, "DPKIT_LOAD_PLUGINS=": False,
        "DPKIT_LOAD_PLUGINS=dpkit-fake-plugin": True, "DPKIT_LOAD_PLUGINS=other": False,
    }


def test_table_values_are_the_plugins_own_callables():
    """Sanity for the tests above: a table entry is the function itself, not a wrapper."""
    from dpkit.layers import linear

    assert registry.table(GRAD)[nn.Linear].value is linear.grad_sampler
