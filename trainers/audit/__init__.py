"""Empirical audits of the DP engine and of trained models.

- :mod:`trainers.audit.whitebox`: ``WhiteboxAuditConfig``, ``run_whitebox_audit`` -> ``WhiteboxAuditResult``
  (white-box gradient-canary one-run audit of the real ``DPEngine``), ``plant_canaries``, ``canary_scores``,
  ``CanaryModel``.
- :mod:`trainers.audit.planted`: ``PlantedBug``, ``buggy_engine_factory``, ``ShuffledUserSampler``,
  ``SqrtKTrapPolicy`` -- deliberately broken engines for tests only (no config or CLI reaches them).
- :mod:`trainers.audit.records`: ``run_record_canary_audit`` -> ``RecordCanaryAuditResult`` (black-box record
  canaries planted as users of the REAL SFT / RM recipe, scored by loss decrease, eps_lb vs the ledger).
- ``launch.run_audits``: ``exposure_audit``, ``mia_audit``, ``heldout_rows`` on a finished run directory (in the
  launcher: it reads a run directory's config).
- :mod:`trainers.audit.mia`: ``log_perplexity``, ``loss_scores``, ``reference_scores``, ``secret_exposure`` for
  causal LMs (statistics in ``accounting.audit``).
"""
