"""``dpkit audit``: train a small bundled model with gradient canaries and set the measured ε next to the claimed one."""
from __future__ import annotations

import argparse

from dpkit.cli._common import EXIT_NO, EXIT_OK, EXIT_USAGE, CommandError, add_json, count, emit, positive
from dpkit.errors import PrivacyUsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="audit a noise plugin and accountant on a bundled model (docs/auditing.md)",
                       description="Train a small bundled model with gradient canaries and print two lower bounds on "
                                   "epsilon next to the accountant's upper bound (one-run, and f-DP (epsilon, delta)). A lower bound of 0 is not a "
                                   "failure: the canaries were guessed no better than chance explains at this "
                                   "confidence, so the audit found no leak; it does not prove the accountant tight "
                                   "either (one run with these canaries cannot certify an epsilon near the "
                                   "accountant's). A lower bound above the accountant's epsilon is a violation "
                                   "(exit 1).")
    p.add_argument("--steps", type=count, default=100, help="full-batch steps (default: %(default)s)")
    p.add_argument("--canaries", type=count, default=100_000,
                   help="Dirac gradient canaries: more give a tighter lower bound; the default is enough to prove "
                        "noise at half its claimed std (default: %(default)s)")
    p.add_argument("--noise-multiplier", type=positive, default=10.0, metavar="SIGMA",
                   help="noise std / max_grad_norm; lower it (e.g. 1) for a lower bound above 0 "
                        "(default: %(default)s)")
    p.add_argument("--sample-rate", type=positive, default=1.0, metavar="Q",
                   help="Poisson sampling rate; 1 (full batch) makes the audit tightest (default: %(default)s)")
    p.add_argument("--delta", type=positive, default=1e-5, help="delta of both bounds (default: %(default)s)")
    p.add_argument("--noise", default="gaussian", metavar="NAME",
                   help="the noise mechanism plugin to audit (default: %(default)s)")
    p.add_argument("--accountant", default="prv", metavar="NAME",
                   help="the accountant whose epsilon the bounds are checked against (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, model, canaries and noise (default: %(default)s)")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Exit 1 when an assumption-free bound (one-run or f-DP (ε, δ)) exceeds the accountant's ε: a proven violation;
    2 for a configuration the audit refuses (a correlated-noise mechanism), which is no verdict on the plugin."""
    from dpkit.audit import bundled_audit

    try:
        report = bundled_audit(steps=args.steps, canaries=args.canaries, noise_multiplier=args.noise_multiplier,
                               sample_rate=args.sample_rate, delta=args.delta, noise=args.noise,
                               accountant=args.accountant, seed=args.seed)
    except PrivacyUsageError as err:
        raise CommandError(str(err), EXIT_USAGE) from err
    emit({"accountant_epsilon": report.accountant_epsilon, "one_run_epsilon": report.bounds.one_run.epsilon,
          "approx_dp_epsilon": report.bounds.approx_dp.epsilon,
          "fdp_epsilon": report.bounds.fdp.epsilon, "violated": report.violated, "suspect": report.suspect,
          "steps": report.steps, "canaries": args.canaries}, str(report), args.json)
    return EXIT_NO if report.violated else EXIT_OK
