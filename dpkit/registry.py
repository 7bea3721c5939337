"""The plugin registry: one lazy pluggy manager, tables with provenance, user decorators.

Order of registration, oldest first: built-in plugins (``BUILTIN_PLUGINS``),
installed packages (entry-point group ``dpkit``), then user decorators. Tables
merge in that order, so the newest registration of a key wins.

A sampler table's key is a layer class or its qualified name (``"package.module.Class"``, a
:class:`LayerName`): a plugin for a heavy library names its classes, so that loading the plugin imports
nothing; the name matches exactly the class it resolves to, once that class's module is imported anyway.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import sys
import types
from collections.abc import Callable, Mapping
from importlib import metadata

import attrs
import pluggy
from torch import nn

from dpkit import hookspecs
from dpkit.errors import PluginError
from dpkit.hookspecs import hookimpl

BUILTIN_PLUGINS: tuple[str, ...] = (
    "dpkit.layers.linear",
    "dpkit.layers.conv",
    "dpkit.layers.embedding",
    "dpkit.layers.normalization",
    "dpkit.layers.recurrent",
    "dpkit.layers.attention",
    "dpkit.clipping.flat",
    "dpkit.clipping.per_layer",
    "dpkit.clipping.automatic",
    "dpkit.clipping.adaptive",
    "dpkit.noise.gaussian",
    "dpkit.noise.bandmf",
    "dpkit.noise.tree",
    "dpkit.noise.blt",
    "dpkit.accountants.rdp",
    "dpkit.accountants.prv",
    "dpkit.accountants.gdp",
)

_SAMPLER_HOOKS = ("dpkit_grad_samplers", "dpkit_norm_samplers")
_FACTORY_HOOKS = ("dpkit_clippers", "dpkit_noise_mechanisms", "dpkit_accountants")


@attrs.frozen
class Entry:
    """A table value and the plugin that provided it."""

    value: Callable
    provider: str


_QUALIFIED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def qualified_name(cls: type) -> str:
    """``package.module.Class``: the name under which a sampler table can hold ``cls`` without importing it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def names(name: str, cls: type) -> bool:
    """Whether ``name`` is exactly ``cls``: its qualified name, resolving to ``cls`` itself in its module.

    Nothing is imported (``cls`` exists, so its module is loaded); a look-alike class with the same name that
    its module does not hold (a local class, a class redefined since) is not ``name``.
    """
    if name != qualified_name(cls):
        return False
    found: object = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is cls


class LayerName(str):
    """A sampler-table key naming a layer class by its qualified name, ``"package.module.Class"``.

    Equal to (and hashed as) the plain string. Like a class it has ``__module__``, ``__qualname__`` and
    ``__name__``, so code that labels table keys as classes labels it by its name.
    """

    def __new__(cls, name: str) -> LayerName:
        self = super().__new__(cls, name)
        self.__module__, _, self.__qualname__ = name.rpartition(".")
        self.__name__ = self.__qualname__
        return self


class LayerTable(dict):
    """A merged sampler table: a class looks up its own entry, or the entry of the name that is exactly it,
    and a name the entry of the class it is."""

    def _key(self, key: object) -> object:
        if dict.__contains__(self, key):
            return key
        if isinstance(key, type):
            name = qualified_name(key)
            return name if dict.__contains__(self, name) and names(name, key) else key
        if isinstance(key, str):
            return next((k for k in self if isinstance(k, type) and names(key, k)), key)
        return key

    def __getitem__(self, key: object) -> Entry:
        return super().__getitem__(self._key(key))

    def __contains__(self, key: object) -> bool:
        return super().__contains__(self._key(key))

    def get(self, key: object, default: object = None) -> object:
        return super().get(self._key(key), default)


def _provides(provided: Mapping, key: object) -> bool:
    """Whether one plugin's table holds ``key``, also under the other kind of key (class or name)."""
    if key in provided:
        return True
    if isinstance(key, type):
        return any(isinstance(k, str) and names(k, key) for k in provided)
    return isinstance(key, str) and any(isinstance(k, type) and names(key, k) for k in provided)


_DISTRIBUTIONS: dict[str, str] = {}  # entry-point plugin name -> "distribution version"


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use (nothing loads at import)."""
    pm = pluggy.PluginManager("dpkit")
    pm.add_hookspecs(hookspecs)
    for name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    _load_entry_points(pm)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        raise PluginError(f"{err}. dpkit hooks are: {', '.join(hookspecs.SPEC_NAMES)}.") from err
    if os.environ.get("DPKIT_TRACE_PLUGINS"):
        pm.trace.root.setwriter(print)
        pm.enable_tracing()
    return pm


def reset() -> None:
    """Forget the manager; the next use rebuilds it (tests, notebooks)."""
    plugin_manager.cache_clear()


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    if os.environ.get("DPKIT_DISABLE_PLUGIN_AUTOLOAD"):
        return
    only = os.environ.get("DPKIT_LOAD_PLUGINS")
    allowed = None if only is None else {s.strip() for s in only.split(",") if s.strip()}
    for ep in metadata.entry_points(group="dpkit"):
        dist = getattr(ep, "dist", None)
        dist_label = f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"
        if allowed is not None and ep.name not in allowed and (dist is None or dist.name not in allowed):
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as err:
            raise PluginError(
                f"dpkit plugin {ep.name!r} ({dist_label}, {ep.value}) failed to import: {err!r}. "
                "Fix or uninstall it, or set DPKIT_DISABLE_PLUGIN_AUTOLOAD=1 to run without installed plugins."
            ) from err
        try:
            pm.register(plugin, name=ep.name)
        except pluggy.PluginValidationError as err:
            raise PluginError(f"dpkit plugin {ep.name!r} ({dist_label}) is invalid: {err}") from err
        _DISTRIBUTIONS[ep.name] = dist_label


def table(hook_name: str) -> dict[object, Entry]:
    """The merged table of one hook, each value with its provider; newest registration wins.

    A sampler table is a :class:`LayerTable`: a class and the name that is exactly that class are one key.
    """
    if hook_name not in _SAMPLER_HOOKS + _FACTORY_HOOKS:
        raise ValueError(f"{hook_name!r} is not a table hook; choose one of {_SAMPLER_HOOKS + _FACTORY_HOOKS}")
    sampler = hook_name in _SAMPLER_HOOKS
    out: dict[object, Entry] = LayerTable() if sampler else {}
    # get_hookimpls() is stored oldest first; updating in that order lets the newest win.
    for impl in getattr(plugin_manager().hook, hook_name).get_hookimpls():
        provided = impl.function()
        _validate(hook_name, provided, impl.plugin_name)
        for key, value in provided.items():
            if sampler:
                out.pop(out._key(key), None)  # the same layer under the other kind of key, registered earlier
                key = LayerName(key) if isinstance(key, str) else key
            out[key] = Entry(value, impl.plugin_name)
    return out


def _validate(hook_name: str, provided: object, plugin: str) -> None:
    where = f"plugin {plugin!r} returned from {hook_name}"
    if not isinstance(provided, Mapping):
        raise PluginError(f"{where} a {type(provided).__name__}; it must return a dict")
    for key, value in provided.items():
        if hook_name in _SAMPLER_HOOKS:
            if not (isinstance(key, type) and issubclass(key, nn.Module)
                    or isinstance(key, str) and _QUALIFIED.fullmatch(key)):
                raise PluginError(f"{where} key {key!r} (a {type(key).__name__}); keys must be nn.Module subclasses "
                                  "or their qualified names ('package.module.Class')")
            check_sampler_signature(value, f"{where} the sampler for {getattr(key, '__name__', key)}")
        else:
            if not isinstance(key, str):
                raise PluginError(f"{where} key {key!r} (a {type(key).__name__}); keys must be names (str)")
            if not callable(value):
                raise PluginError(f"{where} {key!r}: {value!r}, which is not callable")


def check_sampler_signature(fn: object, what: str) -> None:
    """Raise unless ``fn`` can be called as ``fn(layer, activations, backprops, K=1)``."""
    if not callable(fn):
        raise PluginError(f"{what} is {fn!r}, which is not callable")
    try:
        inspect.signature(fn).bind(None, None, None, K=1)
    except TypeError as err:
        raise PluginError(
            f"{what}, {getattr(fn, '__qualname__', fn)!r}, has signature {inspect.signature(fn)}; "
            f"samplers must accept (layer, activations, backprops, K=1): {err}"
        ) from None
    except ValueError:  # builtins without a signature: accept
        pass


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object (a module or instance of ``@hookimpl`` functions) as the newest."""
    pm = plugin_manager()
    if name is not None and pm.get_plugin(name) is not None:
        pm.unregister(name=name)
    try:
        registered = pm.register(plugin, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        raise PluginError(f"{err}. dpkit hooks are: {', '.join(hookspecs.SPEC_NAMES)}.") from err
    return registered


def unregister_plugin(name: str) -> None:
    """Remove a plugin by name (undoes a decorator, or blocks nothing if absent)."""
    pm = plugin_manager()
    if pm.get_plugin(name) is not None:
        pm.unregister(name=name)


def _register_table(hook_name: str, provided: Mapping, name: str) -> None:
    _validate(hook_name, provided, name)
    plugin = types.ModuleType(name)

    def impl():
        return provided

    setattr(plugin, hook_name, hookimpl(specname=hook_name)(impl))
    register_plugin(plugin, name=name)  # a re-run notebook cell replaces its earlier registration


def _sampler_decorator(hook_name: str, layer_types: tuple[type[nn.Module] | str, ...]):
    if not layer_types:
        raise TypeError(f"register_{hook_name[6:-1]}(LayerType, ...) needs at least one layer type")

    def decorator(fn):
        key = "-".join(t if isinstance(t, str) else t.__qualname__ for t in layer_types)
        name = f"user:{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}[{hook_name[6:]}:{key}]"
        _register_table(hook_name, {t: fn for t in layer_types}, name)
        return fn

    return decorator


def register_grad_sampler(*layer_types: type[nn.Module] | str):
    """Decorator: ``fn`` computes per-example gradients for these exact layer types, or the classes these
    qualified names are (newest wins)."""
    return _sampler_decorator("dpkit_grad_samplers", layer_types)


def register_norm_sampler(*layer_types: type[nn.Module] | str):
    """Decorator: ``fn`` computes per-example gradient norms for these exact layer types, or the classes these
    qualified names are (newest wins)."""
    return _sampler_decorator("dpkit_norm_samplers", layer_types)


def overridden(hook_name: str, key: object) -> tuple[str, list[str]] | None:
    """``(winner, built-in providers)`` if a non-built-in plugin provides ``key`` over a built-in, else None."""
    providers = [impl.plugin_name for impl in getattr(plugin_manager().hook, hook_name).get_hookimpls()
                 if _provides(impl.function(), key)]
    builtins = [p for p in providers if p in BUILTIN_PLUGINS]
    if not providers or not builtins or providers[-1] in BUILTIN_PLUGINS:
        return None
    return providers[-1], builtins


def lookup(hook_name: str, name: str, what: str) -> Entry:
    """One named factory (clipper, noise, accountant), or an error listing the names there are."""
    entries = table(hook_name)
    if name not in entries:
        raise PluginError(
            f"{what}={name!r} is not provided by any plugin; installed: {sorted(entries)}. "
            "Install the plugin that provides it, or pick one of these."
        )
    return entries[name]


def plugin_version(plugin_name: str) -> str:
    """The version of the distribution behind a plugin, or dpkit's for built-ins."""
    plugin_manager()
    if plugin_name in _DISTRIBUTIONS:
        return _DISTRIBUTIONS[plugin_name]
    if plugin_name.startswith("dpkit."):
        return f"dpkit {metadata.version('dpkit')}" if _installed("dpkit") else "dpkit (source)"
    return "user code" if plugin_name.startswith("user:") else "?"


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True
