"""``dpkit plugins``: every registered plugin, what it provides (and who overrides it), what each mode covers."""
from __future__ import annotations

import argparse
import textwrap
from typing import Any

from dpkit import plan, registry
from dpkit.cli._common import (EXIT_OK, TABLE_HOOKS, add_json, dpkit_version, emit, hook_failure, key_label,
                               plugin_kind, plugin_version, tables)
from dpkit.plan import type_label


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list plugins, what they provide, and what each mode covers")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    found = report()
    emit(found, format_report(found), args.json)
    return EXIT_OK


def mode_coverage(found: dict[str, dict]) -> dict[str, list[str]]:
    """Which layer types each ``grad_sample_mode`` covers, as the contract states it."""
    grads, norms = found["dpkit_grad_samplers"], found["dpkit_norm_samplers"]
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


def report() -> dict[str, Any]:
    found = tables()
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
            except Exception as err:  # it answered tables() a moment ago: a plugin that fails at random
                raise hook_failure(hook, err) from err
            provides[hook] = [
                {"key": key_label(k), "overridden_by": None if found[hook][k].provider == name
                 else found[hook][k].provider} for k in keys
            ]
        plugins.append({"name": name, "kind": plugin_kind(name), "version": plugin_version(name),
                        "hooks": hooks, "provides": provides})
    return {"dpkit": dpkit_version(), "plugins": plugins, "modes": mode_coverage(found)}


def format_report(found: dict[str, Any]) -> str:
    kinds = [p["kind"] for p in found["plugins"]]
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in ("built-in", "installed", "user") if k in kinds)
    lines = [f"dpkit {found['dpkit']}: {len(kinds)} plugins ({counts})", ""]
    for p in found["plugins"]:
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
    for mode, covered in found["modes"].items():
        lines.append(textwrap.fill(", ".join(covered) or "(none)", width=110, initial_indent=f"  {mode:<10} ",
                                   subsequent_indent=" " * 13, break_on_hyphens=False))
    return "\n".join(lines)
