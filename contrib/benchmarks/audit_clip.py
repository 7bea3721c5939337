"""Detection rates of `dpkit audit --mode clip` at its defaults: the correct mechanism and each planted bug of
tests/audit/test_clip_planted.py, seeds 0-4, one JSON line per run (docs/auditing.md's clip-mode table).

    PYTHONPATH=. python contrib/benchmarks/audit_clip.py
"""
import json
import pathlib
import sys
import time
import warnings

warnings.simplefilter("ignore")  # dpkit's own warnings about the planted configurations
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests" / "audit"))
import test_clip_planted as t  # noqa: E402
from dpkit import audit, registry  # noqa: E402
from dpkit.audit import loops  # noqa: E402

registry.register_plugin(t.PlantedClippers, name="planted_clippers")
loops.LOOPS["realised-mean"] = loops.AuditLoop(t._realised_mean, lambda loader: {"loss_reduction": "sum"})
loops.LOOPS["accumulate"] = loops.AuditLoop(t._accumulate, t._own_sampling)
loops.SAMPLERS["shuffled"] = t._shuffled
for option, name in [("correct", None)] + t.BUGS:
    for seed in range(5):
        t0 = time.process_time()
        r = audit.bundled_clip_audit(seed=seed, **({option: name} if name else {}))
        print(json.dumps({"bug": name, "seed": seed, "failed": r.failed, "violated": r.violated,
                          "claimed": round(r.accountant_epsilon, 3), "proven": round(r.bounds.proven, 3),
                          "fdp": round(r.bounds.fdp.epsilon, 3), "refuted": [c.name for c in r.refuted],
                          "min_p": min(c.p_value for c in r.premises),
                          "cpu_s": round(time.process_time() - t0, 1)}), flush=True)
