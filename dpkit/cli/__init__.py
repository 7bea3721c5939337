"""The ``dpkit`` command: which plugins are installed, whether a model can be trained, and privacy arithmetic.

::

    dpkit plugins [--json]
    dpkit check MODULE:FACTORY [--mode MODE ...] [--batch-size B] [--json]
    dpkit epsilon --noise-multiplier S --sample-rate Q (--steps T | --epochs N) --delta D [--accountant prv] [--json]
    dpkit noise --target-epsilon E --target-delta D --sample-rate Q (--steps T | --epochs N) [--accountant prv]
    dpkit audit [--steps T] [--canaries M] [--noise-multiplier S] [--noise NAME] [--json]

Options carry the Python API's keyword names (``--noise-multiplier``, ``--target-epsilon``, ``--target-delta``);
the short forms ``--sigma``, ``--epsilon`` and ``--delta`` work too. ``dpkit COMMAND --help`` describes every
option with its default; it imports neither the training engine nor scipy, so it answers at once.

Why a command and not only an API: a user deciding between modes, or a plugin author checking that an
installed package is picked up, wants the answer before writing a training loop. Each command is one module
of this package with ``add_parser(subparsers)``, which sets ``run(args) -> exit code``; a new command is a new
module listed in ``COMMANDS``.

Exit codes: 0 success; 1 "no" (a mode named with ``--mode`` refuses the model, no mode can train it, or an
accountant could not answer, or ``audit`` proved a violation); 2 bad arguments (also an ``--accountant`` no plugin provides); 3 the user's module
or factory failed; 4 a plugin failed to load, or its hook or accountant raised. Every failure is one line on
stderr, naming the plugin where one failed; none is a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dpkit.cli import audit, check, epsilon, noise, plugins
from dpkit.cli._common import EXIT_NO, EXIT_PLUGIN, CommandError, dpkit_version
from dpkit.errors import PluginError

COMMANDS = (plugins, check, epsilon, noise, audit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpkit", description="Differentially private training for PyTorch.")
    parser.add_argument("--version", action="version", version=f"dpkit {dpkit_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _joined_negatives(argv: Sequence[str]) -> list[str]:
    """``--delta -1e-5`` as ``--delta=-1e-5``: argparse takes a token that starts with ``-`` and is not a plain
    decimal for an option, and would answer "expected one argument" instead of checking the value's range."""
    out: list[str] = []
    for token in argv:
        last = out[-1] if out else ""
        if last.startswith("-") and "=" not in last and not _is_number(last) and token.startswith("-") \
                and _is_number(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dpkit`` and ``python -m dpkit``; returns the exit code."""
    args = build_parser().parse_args(_joined_negatives(sys.argv[1:] if argv is None else argv))
    try:
        return args.run(args)
    except CommandError as err:
        print(f"dpkit {args.command}: error: {err}", file=sys.stderr)
        return err.code
    except PluginError as err:
        print(f"dpkit {args.command}: error: a plugin failed to load: {err}", file=sys.stderr)
        return EXIT_PLUGIN
    except BrokenPipeError:  # `dpkit plugins | head`: the reader left; say nothing more, as Python's docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_NO
    except Exception as err:  # a dpkit bug: still one line, not a traceback
        print(f"dpkit {args.command}: error: unexpected {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_NO
