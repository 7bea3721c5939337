"""``dpkit audit``: train a small bundled model with canaries and set the measured ε next to the claimed one."""
from __future__ import annotations

import argparse

from dpkit.cli._common import EXIT_NO, EXIT_OK, EXIT_USAGE, CommandError, add_json, count, emit, positive
from dpkit.errors import PrivacyUsageError

#: each mode's defaults for the options whose default depends on it
DEFAULTS = {"noise": {"steps": None, "canaries": 100_000, "noise_multiplier": 10.0, "sample_rate": 1.0},
            "clip": {"steps": 100, "canaries": 10_000, "noise_multiplier": 2.0, "sample_rate": 0.05}}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="audit a noise plugin and accountant, or clipping and sampling, on a bundled "
                                     "model (docs/auditing.md)",
                       description="Train a small bundled model with canaries and print lower bounds on epsilon "
                                   "next to the accountant's upper bound (one-run, and f-DP (epsilon, delta)). A "
                                   "lower bound of 0 is not a failure: the canaries were guessed no better than "
                                   "chance explains at this confidence, so the audit found no leak; it does not "
                                   "prove the accountant tight either. A lower bound above the accountant's "
                                   "epsilon is a violation (exit 1); so, in --mode clip, is a refuted premise of "
                                   "the accountant (the batches are not Poisson samples at its rate, or a release "
                                   "carries less noise than it counts).")
    p.add_argument("--mode", choices=tuple(DEFAULTS), default="noise",
                   help="noise: Dirac gradient canaries added to the clipped sum, full batch (tests the noise "
                        "plugin and the accountant); clip: canaries that are examples of the run, sampled by its "
                        "loader, clipped by its clipper and trained by its loop (tests those too) "
                        "(default: %(default)s)")
    p.add_argument("--steps", type=count, default=None,
                   help="releases (default: 100; in noise mode on BandMF 400, as its canaries join one step in 4, "
                        "a cyclic loader's; on the tree 132, 33 epochs of 4 steps)")
    p.add_argument("--canaries", type=count, default=None,
                   help="canaries: more give a tighter lower bound (default: 100000 in noise mode, enough to prove "
                        "noise at half its claimed std; 10000 in clip mode)")
    p.add_argument("--noise-multiplier", type=positive, default=None, metavar="SIGMA",
                   help="noise std / max_grad_norm (default: 10 in noise mode, 2 in clip mode)")
    p.add_argument("--sample-rate", type=positive, default=None, metavar="Q",
                   help="Poisson sampling rate (default: 1, full batch, in noise mode, which makes that audit "
                        "tightest; 0.05 in clip mode, whose premises are about sampling)")
    p.add_argument("--delta", type=positive, default=1e-5, help="delta of the bounds (default: %(default)s)")
    p.add_argument("--noise", default="gaussian", metavar="NAME",
                   help="the noise mechanism plugin to audit; BandMF and BLT are audited on a cyclic loader, the "
                        "tree (tree, tree-honaker) on shuffled batches, 4 steps per epoch (default: %(default)s)")
    p.add_argument("--clipping", default="flat", metavar="NAME",
                   help="clip mode: the clipper plugin to audit (default: %(default)s)")
    p.add_argument("--loop", default="standard", metavar="NAME",
                   help="clip mode: the training loop, from dpkit.audit.loops.LOOPS (default: %(default)s)")
    p.add_argument("--sampler", default="poisson", metavar="NAME",
                   help="clip mode: the batch sampler, from dpkit.audit.loops.SAMPLERS (default: %(default)s)")
    p.add_argument("--accountant", default="prv", metavar="NAME",
                   help="the accountant whose epsilon the bounds are checked against (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, model, canaries and noise (default: %(default)s)")
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Exit 1 when an assumption-free bound (one-run or f-DP (ε, δ)) exceeds the accountant's ε, or (clip mode) a
    premise of the accountant is refuted; 2 for a configuration the audit refuses (correlated noise it cannot whiten,
    correlated noise in clip mode, an unknown loop or sampler), which is no verdict on the plugin."""
    from dpkit.audit import bundled_audit, bundled_clip_audit

    chosen = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in DEFAULTS[args.mode].items()}
    if args.mode == "noise" and (args.clipping, args.loop, args.sampler) != ("flat", "standard", "poisson"):
        raise CommandError("--clipping, --loop and --sampler choose what --mode clip audits; the noise mode adds its "
                           "canaries after clipping and samples them itself. Add --mode clip.", EXIT_USAGE)
    common = {"delta": args.delta, "noise": args.noise, "accountant": args.accountant, "seed": args.seed, **chosen}
    try:
        if args.mode == "clip":
            report = bundled_clip_audit(clipping=args.clipping, loop=args.loop, sampler=args.sampler, **common)
        else:
            report = bundled_audit(**common)
    except (PrivacyUsageError, ValueError) as err:
        raise CommandError(str(err), EXIT_USAGE) from err
    data = {"accountant_epsilon": report.accountant_epsilon, "one_run_epsilon": report.bounds.one_run.epsilon,
            "approx_dp_epsilon": report.bounds.approx_dp.epsilon, "fdp_epsilon": report.bounds.fdp.epsilon,
            "violated": report.violated, "steps": report.steps, "canaries": chosen["canaries"], "mode": args.mode}
    if args.mode == "clip":
        data["refuted_premises"] = [c.name for c in report.refuted]
        failed = report.failed
    else:
        data["suspect"] = report.suspect
        failed = report.violated
    emit(data, str(report), args.json)
    return EXIT_NO if failed else EXIT_OK
