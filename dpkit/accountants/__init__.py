"""Built-in privacy accountants, each a plugin module with a ``dpkit_accountants`` hook.

* ``prv`` (:mod:`dpkit.accountants.prv`): numerical composition of privacy loss
  distributions; an upper bound within a small, reported error. The default.
* ``rdp`` (:mod:`dpkit.accountants.rdp`): Rényi DP; an upper bound, looser, fast.
* ``gdp`` (:mod:`dpkit.accountants.gdp`): Gaussian-DP central-limit approximation;
  can under-report, and warns.

All three count ``PoissonSampled(q, Gaussian(sigma))`` steps and their compositions
(:mod:`dpkit.accountants._base`).
"""
