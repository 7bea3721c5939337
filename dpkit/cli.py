"""The ``dpkit`` command: which plugins are installed, whether a model can be trained, and privacy arithmetic.

::

    dpkit plugins [--json]
    dpkit check MODULE:FACTORY [--mode MODE ...] [--batch-size B] [--json]
    dpkit epsilon --sigma S --sample-rate Q --steps T --delta D [--accountant prv] [--json]
    dpkit noise --epsilon E --delta D --sample-rate Q (--steps T | --epochs N) [--accountant prv] [--json]

Why a command and not only an API: a user deciding between modes, or a plugin author checking that an
installed package is picked up, wants the answer before writing a training loop. ``check`` runs the same
``dpkit.plan.build_plan`` that ``make_private`` runs, so what it reports is what training would do.

Exit codes: 0 success; 1 "no" (a mode named with ``--mode`` refuses the model, no mode can train it, or an
accountant could not answer); 2 bad arguments (also an ``--accountant`` no plugin provides); 3 the user's module
or factory failed; 4 a plugin failed to load, or its hook or accountant raised. Every failure is one line on
stderr, naming the plugin where one failed; none is a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
import textwrap
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import nn

from dpkit import plan, registry
from dpkit.errors import DPKitError, PluginError

EXIT_OK, EXIT_NO, EXIT_USAGE, EXIT_USER_CODE, EXIT_PLUGIN = 0, 1, 2, 3, 4
SAMPLER_HOOKS = ("dpkit_grad_samplers", "dpkit_norm_samplers")
TABLE_HOOKS = SAMPLER_HOOKS + ("dpkit_clippers", "dpkit_noise_mechanisms", "dpkit_accountants")


class CommandError(Exception):
    """A failure the command reports in one line, with its exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# -- shared helpers ------------------------------------------------------------------------------
def type_label(t: type) -> str:
    """``torch.nn.Linear`` for torch.nn's own layers, ``package.module.Class`` otherwise."""
    if getattr(nn, t.__name__, None) is t:
        return f"torch.nn.{t.__name__}"
    return f"{t.__module__}.{t.__qualname__}"


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
    try:
        return metadata.version("dpkit")
    except metadata.PackageNotFoundError:
        return "(source)"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _emit(data: Any, text: str, as_json: bool) -> None:
    print(json.dumps(data, indent=2, default=str) if as_json else text)


def _tables() -> dict[str, dict]:
    """Every table hook's merged table; a plugin that fails to load, or whose hook raises, ends the command (exit 4)."""
    try:
        registry.plugin_manager()
    except PluginError as err:
        raise CommandError(f"a plugin failed to load: {err}", EXIT_PLUGIN) from err
    except Exception as err:
        raise CommandError(f"the plugins failed to load: {type(err).__name__}: {err}", EXIT_PLUGIN) from err
    tables = {}
    for hook in TABLE_HOOKS:
        try:
            tables[hook] = registry.table(hook)
        except PluginError as err:
            raise CommandError(f"a plugin failed to load: {err}", EXIT_PLUGIN) from err
        except Exception as err:
            raise _hook_failure(hook, err) from err
    return tables


def _hook_failure(hook: str, err: Exception) -> CommandError:
    """An exit-4 error naming the plugin whose ``hook`` raised: each implementation is called again on its own."""
    for impl in getattr(registry.plugin_manager().hook, hook).get_hookimpls():
        try:
            impl.function()
        except Exception as own:
            return CommandError(f"plugin {impl.plugin_name!r} ({plugin_version(impl.plugin_name)}) raised in "
                                f"{hook}: {type(own).__name__}: {own}", EXIT_PLUGIN)
    return CommandError(f"a plugin raised in {hook}: {type(err).__name__}: {err}", EXIT_PLUGIN)


# -- dpkit plugins -------------------------------------------------------------------------------
def mode_coverage(tables: dict[str, dict]) -> dict[str, list[str]]:
    """Which layer types each ``grad_sample_mode`` covers, as the contract states it."""
    grads, norms = tables["dpkit_grad_samplers"], tables["dpkit_norm_samplers"]
    by_norm = [type_label(t) for t in norms]  # ghost and bk prefer a norm sampler
    by_grad = [f"{type_label(t)} (grad sampler only)" for t in grads if t not in norms]
    return {
        "hooks": sorted(type_label(t) for t in grads),
        "ghost": sorted(by_norm + by_grad),
        "bk": sorted(by_norm + by_grad),
        "functorch": ["every layer (torch.func over the whole model)"],
        "ew": sorted(type_label(t) for t in plan.EW_TYPES),
        "auto": ["every layer: the samplers above where registered, a per-layer torch.func fallback elsewhere"],
    }


def plugins_report() -> dict[str, Any]:
    tables = _tables()
    pm = registry.plugin_manager()
    plugins = []
    for name, plugin in pm.list_name_plugin():
        provides: dict[str, list[dict[str, str | None]]] = {}
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        for hook in hooks:
            if hook not in TABLE_HOOKS:
                continue
            impls = [i for i in getattr(pm.hook, hook).get_hookimpls() if i.plugin is plugin]
            try:
                keys = [key for impl in impls for key in impl.function()]
            except Exception as err:  # it answered _tables() a moment ago: a plugin that fails at random
                raise _hook_failure(hook, err) from err
            provides[hook] = [
                {"key": key_label(k), "overridden_by": None if tables[hook][k].provider == name
                 else tables[hook][k].provider} for k in keys
            ]
        plugins.append({"name": name, "kind": plugin_kind(name), "version": plugin_version(name),
                        "hooks": hooks, "provides": provides})
    return {"dpkit": dpkit_version(), "plugins": plugins, "modes": mode_coverage(tables)}


def format_plugins(report: dict[str, Any]) -> str:
    kinds = [p["kind"] for p in report["plugins"]]
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in ("built-in", "installed", "user") if k in kinds)
    lines = [f"dpkit {report['dpkit']}: {len(kinds)} plugins ({counts})", ""]
    for p in report["plugins"]:
        lines.append(f"{p['name']}  [{p['kind']}, {p['version']}]")
        for hook in p["hooks"]:
            entries = p["provides"].get(hook)
            if entries is None:
                lines.append(f"    {hook}")
                continue
            shown = [e["key"] + (f" (overridden by {e['overridden_by']})" if e["overridden_by"] else "")
                     for e in entries]
            lines.append(textwrap.fill(", ".join(shown) or "(empty)", width=110, initial_indent=f"    {hook}: ",
                                       subsequent_indent=" " * 8, break_on_hyphens=False))
    lines += ["", "Layer types each grad_sample_mode covers:"]
    for mode, covered in report["modes"].items():
        lines.append(textwrap.fill(", ".join(covered) or "(none)", width=110, initial_indent=f"  {mode:<10} ",
                                   subsequent_indent=" " * 13, break_on_hyphens=False))
    return "\n".join(lines)


# -- dpkit check ---------------------------------------------------------------------------------
def load_model(spec: str) -> nn.Module:
    """``package.module:factory`` or ``path/to/file.py:factory`` → the model the factory builds."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise CommandError(f"{spec!r} is not MODULE:FACTORY (e.g. mypkg.models:make_model)", EXIT_USAGE)
    try:
        if target.endswith(".py") or os.sep in target:
            loader = importlib.util.spec_from_file_location(Path(target).stem, target)
            if loader is None or not Path(target).is_file():
                raise FileNotFoundError(f"no such file: {target}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # as `python -m` does, so a module in the current folder is found
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except Exception as err:
        raise CommandError(f"could not import {target!r}: {type(err).__name__}: {err}", EXIT_USER_CODE) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CommandError(f"{target!r} has no attribute {attr!r}", EXIT_USER_CODE)
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise CommandError(f"{spec} is a {type(obj).__name__}, neither a model nor a factory", EXIT_USER_CODE)
        try:
            obj = obj()
        except Exception as err:
            raise CommandError(f"{spec}() raised {type(err).__name__}: {err}", EXIT_USER_CODE) from err
    if not isinstance(obj, nn.Module):
        raise CommandError(f"{spec}() returned a {type(obj).__name__}, not a torch.nn.Module", EXIT_USER_CODE)
    return obj


def _layers(model: nn.Module) -> list[tuple[str, nn.Module, dict[str, nn.Parameter]]]:
    """Modules that own trainable parameters, each with the parameters no earlier module owns (tied weights)."""
    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if own:
            out.append((name or "<root>", module, {n: p for n, p in own.items() if id(p) not in seen}))
            seen.update(id(p) for p in own.values())
    return out


def _instantiated(params: dict[str, nn.Parameter], B: int) -> int:
    return sum(B * p.numel() * p.element_size() for p in params.values())


def _cell(row: plan.LayerPlan, module: nn.Module, params: dict, B: int) -> dict[str, Any]:
    """How one planned row treats one layer, and the per-example state it keeps for a batch of B."""
    norm_sampler = getattr(row, "norm_sampler", None)
    if row.mode in ("ghost", "bk") and norm_sampler is not None:
        return {"via": f"norm sampler ({getattr(row, 'norm_provider', None) or row.provider})",
                "bytes": B * 4 * len(params), "note": "norms only; inputs and output gradients are kept"}
    if row.mode == "functorch":
        where = ("torch.func (whole model)" if row.name == "<root>" else "torch.func fallback"
                 if row.module is module else f"torch.func fallback, inside {row.name}")
        return {"via": where, "bytes": _instantiated(params, B), "note": "per-example gradients, recomputed forward"}
    if row.mode == "ew":
        return {"via": "ExpandedWeights", "bytes": _instantiated(params, B), "note": "per-example gradients"}
    return {"via": f"grad sampler ({row.provider})", "bytes": _instantiated(params, B), "note": "per-example gradients"}


def check_report(model: nn.Module, modes: Sequence[str], B: int) -> dict[str, Any]:
    _tables()  # a broken plugin is an environment problem (exit 4), not a property of one mode
    layers = _layers(model)
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        try:
            rows = plan.build_plan(model, mode)
        except DPKitError as err:
            results[mode] = {"ok": False, "error": f"{type(err).__name__}: {err}", "rows": None}
        else:
            results[mode] = {"ok": True, "error": None, "rows": rows}
    report_layers = []
    for name, module, params in layers:
        cells = {}
        for mode, result in results.items():
            if not result["ok"]:
                named = any(line.lstrip().startswith(f"{name} (") for line in result["error"].splitlines())
                cells[mode] = {"via": "refused (see below)" if named else "- (the mode refuses other layers)",
                               "bytes": None}
                continue
            ids = {id(p) for p in module.parameters(recurse=False)}
            row = next((r for r in result["rows"] if ids & {id(p) for p in r.params.values()}), None)
            cells[mode] = _cell(row, module, params, B) if row is not None else {"via": "not planned", "bytes": 0}
        report_layers.append({"name": name, "type": type_label(type(module)),
                              "params": sum(p.numel() for p in params.values()), "modes": cells})
    summary = {mode: {"ok": r["ok"], "error": r["error"],
                      "bytes": sum(L["modes"][mode]["bytes"] or 0 for L in report_layers) if r["ok"] else None,
                      "warnings": _recompute_warnings(r["rows"]) if r["ok"] else []}
               for mode, r in results.items()}
    return {"model": type_label(type(model)), "batch_size": B, "layers": report_layers, "modes": summary}


def _recompute_warnings(rows: list[plan.LayerPlan]) -> list[str]:
    """Active dropout inside a unit that torch.func recomputes: training would stop at the first backward."""
    out = []
    for row in rows:
        if row.mode != "functorch":
            continue
        for name, sub in row.module.named_modules():
            if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0 and sub.training:
                where = ".".join(n for n in (row.name if row.name != "<root>" else "", name) if n) or "<root>"
                out.append(f"{where} ({type_label(type(sub))}, p={sub.p:g}) is active dropout inside a torch.func "
                           "unit, which cannot replay its random masks: the first backward will raise. Set p=0 "
                           "(or call .eval() on it), or use a mode whose samplers cover its layer.")
    return out


MEMORY_NOTES = {
    "hooks": "p.grad_sample for every parameter: B x parameter count x dtype bytes",
    "ew": "like hooks: ExpandedWeights materialises per-example gradients",
    "functorch": "per-example gradients of every parameter at once, plus vmap's per-example forward recompute",
    "ghost": "norm-sampled layers keep B norms plus their inputs and output gradients (~B x T x width), "
             "which grows with sequence length, not with parameter count",
    "bk": "as ghost, in one backward pass",
    "auto": "per layer, whichever sampler the plan picked",
}


def format_check(report: dict[str, Any]) -> str:
    B = report["batch_size"]
    modes = list(report["modes"])
    lines = [f"model {report['model']}: {len(report['layers'])} layers with trainable parameters, "
             f"{sum(L['params'] for L in report['layers']):,} parameters; memory for B={B} examples", ""]
    for L in report["layers"]:
        lines.append(f"{L['name']}  ({L['type']}, {L['params']:,} parameters)")
        for mode in modes:
            cell = L["modes"][mode]
            memory = "" if cell["bytes"] is None else _human(cell["bytes"])
            lines.append(f"    {mode:<10} {cell['via']:<52} {memory}".rstrip())
    lines += ["", f"{'mode':<10} {'status':<8} per-example state for B={B}"]
    for mode in modes:
        s = report["modes"][mode]
        status = f"{_human(s['bytes']):<12} {MEMORY_NOTES[mode]}" if s["ok"] else "-"
        lines.append(f"{mode:<10} {'ok' if s['ok'] else 'refused':<8} {status}")
    warned = [(m, w) for m, s in report["modes"].items() for w in s["warnings"]]
    if warned:
        lines += ["", "Warnings:"] + [f"  {mode}: {warning}" for mode, warning in warned]
    refused = [(m, s["error"]) for m, s in report["modes"].items() if not s["ok"]]
    if refused:
        lines += ["", "Refused:"]
        for mode, error in refused:
            lines.append(f"  {mode}: " + error.replace("\n", "\n    "))
    return "\n".join(lines)


# -- dpkit epsilon / dpkit noise -----------------------------------------------------------------
def _accounting():
    """Imported on use: accounting pulls in scipy, and ``dpkit plugins`` should not pay for it."""
    try:
        from dpkit import accounting
    except ImportError as err:
        raise CommandError(f"dpkit.accounting is not available in this installation: {err}", EXIT_NO) from err
    return accounting


def _ask(fn_name: str, **kwargs: Any) -> float:
    """``dpkit.accounting.fn_name(**kwargs)``; an unknown accountant is a bad argument, a failing plugin exit 4."""
    name = kwargs["accountant"]
    accountants = _tables()["dpkit_accountants"]
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


def _json_number(x: float) -> float | str:
    """``x``, or ``"inf"``: JSON has no infinity (an honest epsilon can be one)."""
    return x if math.isfinite(x) else str(x)


def cmd_epsilon(args: argparse.Namespace) -> int:
    query = {"accountant": args.accountant, "noise_multiplier": args.sigma, "sample_rate": args.sample_rate,
             "steps": args.steps, "delta": args.delta}
    eps = _ask("get_epsilon", **query)
    text = (f"epsilon = {eps:.6g} at delta = {args.delta:g}  (accountant {args.accountant}: noise multiplier "
            f"{args.sigma:g}, sample rate {args.sample_rate:g}, {args.steps} steps)")
    _emit({**query, "epsilon": _json_number(eps)}, text, args.json)
    return EXIT_OK


def cmd_noise(args: argparse.Namespace) -> int:
    query = {"target_epsilon": args.epsilon, "target_delta": args.delta, "sample_rate": args.sample_rate,
             "accountant": args.accountant}
    query.update({"steps": args.steps} if args.steps is not None else {"epochs": args.epochs})
    sigma = _ask("get_noise_multiplier", **query)
    length = f"{args.steps} steps" if args.steps is not None else f"{args.epochs:g} epochs"
    text = (f"noise multiplier = {sigma:.6g}  (accountant {args.accountant}: epsilon {args.epsilon:g} at delta "
            f"{args.delta:g}, sample rate {args.sample_rate:g}, {length})")
    _emit({**query, "noise_multiplier": _json_number(sigma)}, text, args.json)
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    report = plugins_report()
    _emit(report, format_plugins(report), args.json)
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    model = load_model(args.factory)
    report = check_report(model, args.mode or plan.MODES, args.batch_size)
    _emit(report, format_check(report), args.json)
    ok = [s["ok"] for s in report["modes"].values()]
    return EXIT_OK if (all(ok) if args.mode else any(ok)) else EXIT_NO


# -- argument parsing ----------------------------------------------------------------------------
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
non_negative = _number(float, 0, float("inf"), False, True)
probability = _number(float, 0, 1, True, False)
delta_value = _number(float, 0, 1, True, True)
count = _number(int, 1, 2**53, False, False)  # beyond, float64 cannot count steps exactly


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpkit", description="Differentially private training for PyTorch.")
    parser.add_argument("--version", action="version", version=f"dpkit {dpkit_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plugins", help="list plugins, what they provide, and what each mode covers")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_plugins)

    p = sub.add_parser("check", help="which modes and plugins would train a model, and their memory")
    p.add_argument("factory", metavar="MODULE:FACTORY",
                   help="a model or a no-argument function returning one: pkg.module:make or path/file.py:make")
    p.add_argument("--mode", action="append", choices=plan.MODES,
                   help="check only this mode (repeatable); exit 1 if any named mode refuses the model")
    p.add_argument("--batch-size", "-B", type=count, default=32, help="B for memory estimates (default 32)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("epsilon", help="epsilon spent by DP-SGD with a given noise multiplier")
    p.add_argument("--sigma", "--noise-multiplier", type=positive, required=True, help="noise multiplier")
    p.add_argument("--sample-rate", "-q", type=probability, required=True, help="Poisson sampling rate q")
    p.add_argument("--steps", "-T", type=count, required=True, help="number of optimizer steps")
    p.add_argument("--delta", type=delta_value, required=True, help="target delta, e.g. 1e-5 (below 1/N)")
    p.add_argument("--accountant", default="prv", help="accountant plugin name (default prv)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_epsilon)

    p = sub.add_parser("noise", help="the smallest noise multiplier that reaches a target epsilon")
    p.add_argument("--epsilon", type=positive, required=True, help="target epsilon")
    p.add_argument("--delta", type=delta_value, required=True, help="target delta, e.g. 1e-5 (below 1/N)")
    p.add_argument("--sample-rate", "-q", type=probability, required=True, help="Poisson sampling rate q")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", "-T", type=count, help="number of optimizer steps")
    length.add_argument("--epochs", type=positive, help="number of epochs (steps = epochs / sample rate)")
    p.add_argument("--accountant", default="prv", help="accountant plugin name (default prv)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_noise)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dpkit`` and ``python -m dpkit``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
