"""``dpkit check``: the plan ``make_private`` would build for a model in each mode, its memory, and refusals.

It runs the same ``dpkit.plan.build_plan`` that ``make_private`` runs, so what it reports is what training
would do; the tables are those ``print(private.plan)`` shows, with the per-example state each row keeps.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from dpkit import plan
from dpkit.cli._common import (EXIT_NO, EXIT_OK, EXIT_USAGE, EXIT_USER_CODE, CommandError, add_json, count, emit,
                               human, tables)
from dpkit.errors import DPKitError
from dpkit.plan import type_label

MEMORY_NOTES = {
    "hooks": "p.grad_sample for every parameter: B x parameter count x dtype bytes",
    "ew": "like hooks: ExpandedWeights materialises per-example gradients",
    "functorch": "per-example gradients of every parameter at once, plus vmap's per-example forward recompute",
    "ghost": "B norms per norm-sampled layer (*)",
    "bk": "as ghost, in one backward pass (*)",
    "auto": "per layer, whichever sampler the plan picked (*: where it picked a norm sampler)",
}
NOT_COUNTED = ("Not counted, in any mode: the activations autograd keeps for the backward pass (as much as "
               "without DP). (*) A norm sampler also works on its layer's input and output gradient, about "
               "B x T x width per layer (T: sequence length or spatial size), which depends on inputs that "
               "dpkit check does not see; for long sequences or large images it can exceed hooks' "
               "per-example gradients.")
FROZEN = ("ValueError: the model has no trainable parameters (every requires_grad is False), and make_private "
          "refuses it. Unfreeze the parameters to train (p.requires_grad_(True)) before make_private.")
_MODE = "\0mode\0"  # where a refusal names its mode, so that refusals differing only there are printed once


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="the plan each mode would build for a model, its memory, and refusals")
    p.add_argument("factory", metavar="MODULE:FACTORY",
                   help="a model or a no-argument function returning one: pkg.module:make or path/file.py:make")
    p.add_argument("--mode", action="append", choices=plan.MODES,
                   help="check only this mode (repeatable; default: every mode); exit 1 if a named mode refuses "
                        "the model")
    p.add_argument("--batch-size", "-B", type=count, default=32,
                   help="batch size B of the memory estimates (default: %(default)s)")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(args.factory)
    found = report(model, args.mode or plan.MODES, args.batch_size)
    emit(found, format_report(found), args.json)
    ok = [s["ok"] for s in found["modes"].values()]
    return EXIT_OK if (all(ok) if args.mode else any(ok)) else EXIT_NO


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


def _layers(model: nn.Module) -> list[dict[str, Any]]:
    """Modules that own trainable parameters, counting only parameters no earlier module owns (tied weights)."""
    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own:
            out.append({"name": name or "<root>", "type": type_label(type(module)),
                        "params": sum(p.numel() for p in own if id(p) not in seen)})
            seen.update(id(p) for p in own)
    return out


def _rows(rows: plan.Plan, B: int) -> list[dict[str, Any]]:
    """The plan's table rows, each with the per-example state it keeps for a batch of B (tied weights once)."""
    seen: set[int] = set()
    out = []
    for row in rows:
        params = [p for p in row.params.values() if id(p) not in seen]
        seen.update(id(p) for p in params)
        norms_only = row.sampler_label == "norm sampler"
        size = B * 4 * len(params) if norms_only else sum(B * p.numel() * p.element_size() for p in params)
        out.append({**dict(zip(("module", "type", "mode", "sampler", "provider"), row.cells())), "bytes": size,
                    "note": "norms only; inputs and output gradients are kept" if norms_only
                    else "per-example gradients"})
    return out


def report(model: nn.Module, modes: Sequence[str], B: int) -> dict[str, Any]:
    tables()  # a broken plugin is an environment problem (exit 4), not a property of one mode
    summary: dict[str, dict[str, Any]] = {}
    frozen = not any(p.requires_grad for p in model.parameters())
    for mode in modes:
        if frozen:  # make_private's own refusal, before any plan is built
            summary[mode] = {"ok": False, "error": FROZEN, "bytes": None, "warnings": [], "plan": None}
            continue
        try:
            rows = plan.build_plan(model, mode)
        except DPKitError as err:
            summary[mode] = {"ok": False, "error": f"{type(err).__name__}: {err}", "bytes": None, "warnings": [],
                             "plan": None}
        else:
            table = _rows(rows, B)
            summary[mode] = {"ok": True, "error": None, "bytes": sum(r["bytes"] for r in table),
                             "warnings": _recompute_warnings(rows), "plan": table}
    return {"model": type_label(type(model)), "batch_size": B, "layers": _layers(model), "modes": summary,
            "not_counted": NOT_COUNTED}


def _recompute_warnings(rows: plan.Plan) -> list[str]:
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


def _refusals(modes: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """(which modes, error) with each error once: BatchNorm refuses every mode with the same words."""
    groups: dict[str, list[str]] = {}
    for mode, s in modes.items():
        if not s["ok"]:
            groups.setdefault(s["error"].replace(f"grad_sample_mode={mode!r}", f"grad_sample_mode={_MODE}"),
                              []).append(mode)
    return [("every mode" if set(group) == set(plan.MODES) else ", ".join(group),
             error.replace(_MODE, " or ".join(map(repr, group)))) for error, group in groups.items()]


def format_report(found: dict[str, Any]) -> str:
    B, modes = found["batch_size"], found["modes"]
    lines = [f"model {found['model']}: {len(found['layers'])} layers with trainable parameters, "
             f"{sum(L['params'] for L in found['layers']):,} parameters; per-example state for B={B} examples"]
    for mode, s in modes.items():
        if s["ok"]:
            cells = [(r["module"], r["type"], r["mode"], r["sampler"], r["provider"], human(r["bytes"]))
                     for r in s["plan"]]
            lines += ["", f"grad_sample_mode={mode!r}: the plan make_private would build",
                      plan.format_table(plan.Plan.HEADER + ("memory",), cells, indent="  ")]
    if any(s["ok"] for s in modes.values()):
        lines += ["", f"{'mode':<10} {'status':<8} per-example state for B={B} (what DP adds; see Not counted)"]
        for mode, s in modes.items():
            status = f"{human(s['bytes']):<12} {MEMORY_NOTES[mode]}" if s["ok"] else "- (see Refused below)"
            lines.append(f"{mode:<10} {'ok' if s['ok'] else 'refused':<8} {status}")
        lines += [""] + textwrap.wrap(NOT_COUNTED, width=110)
    warned = [(m, w) for m, s in modes.items() for w in s["warnings"]]
    if warned:
        lines += ["", "Warnings:"] + [f"  {mode}: {warning}" for mode, warning in warned]
    refused = _refusals(modes)
    if refused:
        lines += ["", "Refused:"] + [f"  {which}: " + error.replace("\n", "\n    ") for which, error in refused]
    return "\n".join(lines)
