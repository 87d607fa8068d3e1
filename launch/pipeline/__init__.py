"""Pipeline infrastructure of `dpalign run`: the run directory, metrics and the report.

Modules (no torch or Ray at import time):
    rundir   ``RunDir``: layout of a run directory, resolved config, atomic stage outputs and done markers,
             resume with a config check. Never writes the ledger.
    metrics  ``MetricsLogger``: namespaced TensorBoard scalars + metrics.jsonl, refusing private statistics
             that were not released with noise.
    report   report.json (schema in docs/report_schema.md), report.md with PNG plots, ``mean_ci95``.
"""
