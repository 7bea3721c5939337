"""The power of the bundled audit: which under-noising it proves, per setting (docs/auditing.md's power table).

A noise plugin that adds ``factor`` times the std it is asked for is audited with ``dpkit.audit.bundled_audit`` at
each setting and seed; the table gives each run's assumption-free bound (the larger of one-run and f-DP (ε, δ))
against the claimed ε, and per setting the mildest under-noising (the largest factor) proven in every seed.
Not a test: nothing asserts. Run from the repository root, one core:

    PYTHONPATH=$PWD taskset -c 0 python contrib/benchmarks/audit_power.py --save
"""
from __future__ import annotations

import argparse
import pathlib
import time
import warnings

import dpkit
from dpkit import audit, registry
from dpkit.hookspecs import hookimpl
from dpkit.noise.gaussian import GaussianNoise

SETTINGS = [  # (steps, noise multiplier, canaries): the default last
    (100, 10.0, 1_000),
    (100, 10.0, 10_000),
    (100, 20.0, 100_000),
    (100, 10.0, 100_000),
]
FACTORS = (0.3, 0.4, 0.5, 0.6, 0.7, 1.0)


def _scaled(factor: float) -> type:
    class Scaled(GaussianNoise):
        def add(self, clipped_sum, *, std):
            return super().add(clipped_sum, std=factor * std)

    return Scaled


class _Plugins:
    @staticmethod
    @hookimpl
    def dpkit_noise_mechanisms():
        return {f"scaled-{f}": _scaled(f) for f in FACTORS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--save", action="store_true", help="write results/audit-power.md")
    args = parser.parse_args()
    registry.register_plugin(_Plugins, name="audit_power")
    warnings.simplefilter("ignore", dpkit.PluginOverrideWarning)
    lines = ["| steps | noise multiplier | canaries | claimed ε | " + " | ".join(f"×{f}" for f in FACTORS)
             + " | mildest proven | s/run |", "|" + " --- |" * (len(FACTORS) + 6)]
    for steps, sigma, canaries in SETTINGS:
        cells, proven, claimed, seconds = [], [], 0.0, []
        for factor in FACTORS:
            bounds = []
            for seed in range(args.seeds):
                start = time.process_time()
                report = audit.bundled_audit(steps=steps, noise_multiplier=sigma, canaries=canaries,
                                             noise=f"scaled-{factor}", seed=seed)
                seconds.append(time.process_time() - start)
                claimed = report.accountant_epsilon
                bounds.append(report.bounds.proven)
            cells.append(" / ".join(f"{b:.2f}" + ("*" if b > claimed else "") for b in bounds))
            if factor < 1 and all(b > claimed for b in bounds):
                proven.append(factor)
        mildest = f"×{max(proven)}" if proven else "none"
        row = (f"| {steps} | {sigma:g} | {canaries} | {claimed:.2f} | " + " | ".join(cells)
               + f" | {mildest} | {sum(seconds) / len(seconds):.1f} |")
        lines.append(row)
        print(row, flush=True)
    table = "\n".join(lines)
    print(table)
    if args.save:
        out = pathlib.Path(__file__).parent / "results" / "audit-power.md"
        out.write_text("Assumption-free lower bound (max of one-run and f-DP (ε, δ)) per seed; * above the claimed ε.\n"
                       "CPU seconds per run on one core.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
