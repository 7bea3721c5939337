"""``dpkit noise``: the smallest noise multiplier that reaches a target epsilon."""
from __future__ import annotations

import argparse

from dpkit.cli._accountant import add_common, ask, json_number
from dpkit.cli._common import EXIT_OK, add_json, count, emit, positive


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("noise", help="the smallest noise multiplier that reaches a target epsilon")
    p.add_argument("--epsilon", type=positive, required=True, help="target epsilon")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", "-T", type=count, help="number of optimizer steps")
    length.add_argument("--epochs", type=positive, help="number of epochs (steps = epochs / sample rate)")
    add_common(p)
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    query = {"target_epsilon": args.epsilon, "target_delta": args.delta, "sample_rate": args.sample_rate,
             "accountant": args.accountant}
    query.update({"steps": args.steps} if args.steps is not None else {"epochs": args.epochs})
    sigma = ask("get_noise_multiplier", **query)
    length = f"{args.steps} steps" if args.steps is not None else f"{args.epochs:g} epochs"
    text = (f"noise multiplier = {sigma:.6g}  (accountant {args.accountant}: epsilon {args.epsilon:g} at delta "
            f"{args.delta:g}, sample rate {args.sample_rate:g}, {length})")
    emit({**query, "noise_multiplier": json_number(sigma)}, text, args.json)
    return EXIT_OK
