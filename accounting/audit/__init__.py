"""Empirical privacy audits: the statistics (pure numpy/scipy; no torch, no Ray).

- :mod:`accounting.audit.one_run`: the one-run audit (Steinke, Nasr & Jagielski 2023): ``p_value``,
  ``epsilon_lower_bound``, ``draw_inclusion``, ``guesses_from_scores``, ``audit_scores``,
  ``audit_scores_best_of``, ``default_candidates``, ``OneRunResult``.
- :mod:`accounting.audit.mia`: ``auc_with_ci`` (DeLong, logit scale), ``tpr_at_fpr``, ``AucResult``.
- :mod:`accounting.audit.exposure`: canary exposure (Carlini et al. 2019): ``exposure_exact``,
  ``exposure_sampled``, ``exposure_extrapolated``.
- :mod:`accounting.audit.sampling`: is a sampler Poisson? ``poisson_inclusion_test``.

How to read an audit: eps_lb <= claimed eps is consistent with the guarantee, not a proof of it; eps_lb > claimed
eps at the stated confidence is a bug in the mechanism or its accounting.
"""
