"""What ``dpkit epsilon`` and ``dpkit noise`` share: one call into ``dpkit.accounting``, errors as exit codes."""
from __future__ import annotations

import argparse
import math
from typing import Any

from dpkit.cli._common import (EXIT_NO, EXIT_PLUGIN, EXIT_USAGE, CommandError, count, delta_value, plugin_kind,
                               plugin_version, positive, probability, tables)
from dpkit.errors import DPKitError, PluginError


def add_common(parser: argparse.ArgumentParser, delta_name: str) -> None:
    """The arguments both commands take: the run's length, delta, sample rate and accountant.

    Each option answers to the Python keyword's name too (``--noise-multiplier``, ``--target-delta``): a flag
    copied from a script's ``get_epsilon(...)`` call works as written.
    """
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--steps", "-T", type=count, metavar="T", help="number of optimizer steps (this or --epochs)")
    group.add_argument("--epochs", type=positive, metavar="N",
                        help="number of epochs: steps = ceil(epochs / sample rate), as in the Python API")
    flags = ("--delta", "--target-delta") if delta_name == "delta" else ("--target-delta", "--delta")
    parser.add_argument(*flags, dest="delta", type=delta_value, required=True, metavar="DELTA",
                        help="delta of (epsilon, delta)-DP, e.g. 1e-5; keep it below 1/(dataset size) (required)")
    parser.add_argument("--sample-rate", "-q", type=probability, required=True, metavar="Q",
                        help="Poisson sampling rate: expected batch size / dataset size (required)")
    parser.add_argument("--accountant", default="prv", metavar="NAME",
                        help="accountant plugin: prv (tight upper bound), rdp (looser upper bound) or gdp "
                             "(approximation, can under-report); see `dpkit plugins` (default: %(default)s)")


def length(args: argparse.Namespace) -> dict[str, Any]:
    """``{"steps": T}`` or ``{"epochs": N}``, whichever was given."""
    return {"steps": args.steps} if args.steps is not None else {"epochs": args.epochs}


def length_text(args: argparse.Namespace) -> str:
    return f"{args.steps} steps" if args.steps is not None else f"{args.epochs:g} epochs"


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
