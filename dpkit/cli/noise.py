"""``dpkit noise``: the smallest noise multiplier that reaches a target epsilon."""
from __future__ import annotations

import argparse

from dpkit.cli._accountant import add_common, ask, json_number, length, length_text
from dpkit.cli._common import EXIT_OK, add_json, emit, positive


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("noise", help="the smallest noise multiplier that reaches a target epsilon",
                       description="The noise multiplier whose run spends at most the target epsilon: "
                                   "dpkit.get_noise_multiplier(...) from the shell. Options take the Python "
                                   "keywords' names too.")
    p.add_argument("--target-epsilon", "--epsilon", dest="epsilon", type=positive, required=True, metavar="EPSILON",
                   help="the epsilon the whole run may spend (required)")
    add_common(p, delta_name="target_delta")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    query = {"target_epsilon": args.epsilon, "target_delta": args.delta, "sample_rate": args.sample_rate,
             "accountant": args.accountant, **length(args)}
    sigma = ask("get_noise_multiplier", **query)
    text = (f"noise multiplier = {sigma:.6g}  (accountant {args.accountant}: epsilon {args.epsilon:g} at delta "
            f"{args.delta:g}, sample rate {args.sample_rate:g}, {length_text(args)})")
    emit({**query, "noise_multiplier": json_number(sigma)}, text, args.json)
    return EXIT_OK
