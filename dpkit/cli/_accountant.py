"""What ``dpkit epsilon`` and ``dpkit noise`` share: one call into ``dpkit.accounting``, errors as exit codes."""
from __future__ import annotations

import argparse
import math
from typing import Any

from dpkit.cli._common import (EXIT_NO, EXIT_PLUGIN, EXIT_USAGE, CommandError, delta_value, plugin_kind,
                               plugin_version, probability, tables)
from dpkit.errors import DPKitError, PluginError


def add_common(parser: argparse.ArgumentParser) -> None:
    """The arguments both commands take: delta, sample rate and accountant."""
    parser.add_argument("--delta", type=delta_value, required=True, help="target delta, e.g. 1e-5 (below 1/N)")
    parser.add_argument("--sample-rate", "-q", type=probability, required=True, help="Poisson sampling rate q")
    parser.add_argument("--accountant", default="prv", help="accountant plugin name (default prv)")


def _accounting():
    """Imported on use: accounting pulls in scipy, and ``dpkit plugins`` should not pay for it."""
    try:
        from dpkit import accounting
    except ImportError as err:
        raise CommandError(f"dpkit.accounting is not available in this installation: {err}", EXIT_NO) from err
    return accounting


def ask(fn_name: str, **kwargs: Any) -> float:
    """``dpkit.accounting.fn_name(**kwargs)``; an unknown accountant is a bad argument, a failing plugin exit 4."""
    name = kwargs["accountant"]
    accountants = tables()["dpkit_accountants"]
    if name not in accountants:
        raise CommandError(f"--accountant {name!r} is not provided by any plugin; installed: "
                           f"{', '.join(sorted(accountants))}", EXIT_USAGE)
    provider = accountants[name].provider
    fn = getattr(_accounting(), fn_name)
    try:
        return float(fn(**kwargs))
    except PluginError as err:
        raise CommandError(f"a plugin failed to load: {err}", EXIT_PLUGIN) from err
    except (ValueError, ArithmeticError, DPKitError) as err:
        raise CommandError(f"{fn_name} could not answer: {err}", EXIT_NO) from err
    except Exception as err:
        if plugin_kind(provider) == "built-in":
            raise CommandError(f"{fn_name} failed: {type(err).__name__}: {err}", EXIT_NO) from err
        raise CommandError(f"accountant {name!r} of plugin {provider!r} ({plugin_version(provider)}) raised "
                           f"{type(err).__name__}: {err}", EXIT_PLUGIN) from err


def json_number(x: float) -> float | str:
    """``x``, or ``"inf"``: JSON has no infinity (an honest epsilon can be one)."""
    return x if math.isfinite(x) else str(x)
