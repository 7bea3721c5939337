"""``dpkit epsilon``: the epsilon that DP-SGD spends with a given noise multiplier."""
from __future__ import annotations

import argparse

from dpkit.cli._accountant import add_common, ask, json_number, length, length_text
from dpkit.cli._common import EXIT_OK, add_json, emit, positive


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("epsilon", help="epsilon spent by DP-SGD with a given noise multiplier",
                       description="The epsilon that a run of DP-SGD spends: dpkit.get_epsilon(...) from the shell. "
                                   "Options take the Python keywords' names too.")
    p.add_argument("--noise-multiplier", "--sigma", dest="noise_multiplier", type=positive, required=True,
                   metavar="SIGMA", help="noise std / max_grad_norm, as in make_private (required)")
    add_common(p, delta_name="delta")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    query = {"accountant": args.accountant, "noise_multiplier": args.noise_multiplier,
             "sample_rate": args.sample_rate, **length(args), "delta": args.delta}
    eps = ask("get_epsilon", **query)
    text = (f"epsilon = {eps:.6g} at delta = {args.delta:g}  (accountant {args.accountant}: noise multiplier "
            f"{args.noise_multiplier:g}, sample rate {args.sample_rate:g}, {length_text(args)})")
    emit({**query, "epsilon": json_number(eps)}, text, args.json)
    return EXIT_OK
