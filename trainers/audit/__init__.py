"""Empirical audits of the DP engine and of trained models.

- :mod:`trainers.audit.whitebox`: ``WhiteboxAuditConfig``, ``run_whitebox_audit`` -> ``WhiteboxAuditResult``
  (white-box gradient-canary one-run audit of the real ``DPEngine``), ``plant_canaries``, ``canary_scores``,
  ``CanaryModel``.
- :mod:`trainers.audit.planted`: ``PlantedBug``, ``buggy_engine_factory``, ``ShuffledUserSampler``,
  ``SqrtKTrapPolicy`` -- deliberately broken engines for tests only (no config or CLI reaches them).
- :mod:`trainers.audit.mia`: ``log_perplexity``, ``loss_scores``, ``reference_scores``, ``secret_exposure`` for
  causal LMs (statistics in ``accounting.audit``).
"""
