"""What every ``dpkit`` command shares: exit codes, one-line errors, plugin tables and labels, argument types."""
from __future__ import annotations

import argparse
import json
from importlib import metadata
from typing import Any

from dpkit import registry
from dpkit.errors import PluginError
from dpkit.plan import type_label

EXIT_OK, EXIT_NO, EXIT_USAGE, EXIT_USER_CODE, EXIT_PLUGIN = 0, 1, 2, 3, 4
SAMPLER_HOOKS = ("dpkit_grad_samplers", "dpkit_norm_samplers")
TABLE_HOOKS = SAMPLER_HOOKS + ("dpkit_clippers", "dpkit_noise_mechanisms", "dpkit_accountants")


class CommandError(Exception):
    """A failure the command reports in one line, with its exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def key_label(key: object) -> str:
    return type_label(key) if isinstance(key, type) else str(key)


def plugin_kind(name: str) -> str:
    if name in registry.BUILTIN_PLUGINS:
        return "built-in"
    return "user" if name.startswith("user:") else "installed"


def plugin_version(name: str) -> str:
    """Distribution and version; entry-point plugins are looked up by name when the registry does not know."""
    found = registry.plugin_version(name)
    if found != "?":
        return found
    for ep in metadata.entry_points(group="dpkit"):
        dist = getattr(ep, "dist", None)
        if ep.name == name and dist is not None:
            return f"{dist.name} {dist.version}"
    return "unknown distribution"


def dpkit_version() -> str:
    import dpkit

    return dpkit.__version__


def human(n: float) -> str:
    """Bytes in B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def emit(data: Any, text: str, as_json: bool) -> None:
    print(json.dumps(data, indent=2, default=str) if as_json else text)


def tables() -> dict[str, dict]:
    """Every table hook's merged table; a plugin that fails to load, or whose hook raises, ends the command (exit 4)."""
    try:
        registry.plugin_manager()
    except PluginError as err:
        raise CommandError(f"a plugin failed to load: {err}", EXIT_PLUGIN) from err
    except Exception as err:
        raise CommandError(f"the plugins failed to load: {type(err).__name__}: {err}", EXIT_PLUGIN) from err
    found = {}
    for hook in TABLE_HOOKS:
        try:
            found[hook] = registry.table(hook)
        except PluginError as err:
            raise CommandError(f"a plugin failed to load: {err}", EXIT_PLUGIN) from err
        except Exception as err:
            raise hook_failure(hook, err) from err
    return found


def hook_failure(hook: str, err: Exception) -> CommandError:
    """An exit-4 error naming the plugin whose ``hook`` raised: each implementation is called again on its own."""
    for impl in getattr(registry.plugin_manager().hook, hook).get_hookimpls():
        try:
            impl.function()
        except Exception as own:
            return CommandError(f"plugin {impl.plugin_name!r} ({plugin_version(impl.plugin_name)}) raised in "
                                f"{hook}: {type(own).__name__}: {own}", EXIT_PLUGIN)
    return CommandError(f"a plugin raised in {hook}: {type(err).__name__}: {err}", EXIT_PLUGIN)


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _number(kind: type, low: float, high: float, low_open: bool, high_open: bool):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {span}")
        return value

    return parse


positive = _number(float, 0, float("inf"), True, True)
probability = _number(float, 0, 1, True, False)
delta_value = _number(float, 0, 1, True, True)
count = _number(int, 1, 2**53, False, False)  # beyond, float64 cannot count steps exactly
