"""``dpkit epsilon``: the epsilon that DP-SGD spends with a given noise multiplier."""
from __future__ import annotations

import argparse

from dpkit.cli._accountant import add_common, ask, json_number
from dpkit.cli._common import EXIT_OK, add_json, count, emit, positive


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("epsilon", help="epsilon spent by DP-SGD with a given noise multiplier")
    p.add_argument("--sigma", "--noise-multiplier", type=positive, required=True, help="noise multiplier")
    p.add_argument("--steps", "-T", type=count, required=True, help="number of optimizer steps")
    add_common(p)
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    query = {"accountant": args.accountant, "noise_multiplier": args.sigma, "sample_rate": args.sample_rate,
             "steps": args.steps, "delta": args.delta}
    eps = ask("get_epsilon", **query)
    text = (f"epsilon = {eps:.6g} at delta = {args.delta:g}  (accountant {args.accountant}: noise multiplier "
            f"{args.sigma:g}, sample rate {args.sample_rate:g}, {args.steps} steps)")
    emit({**query, "epsilon": json_number(eps)}, text, args.json)
    return EXIT_OK
