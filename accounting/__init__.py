"""dpalign: accounting -- what every run costs, re-checkable with dp-accounting alone (no torch, no Ray).

Modules: events (PrivacyEvent), mechanisms (sigma_eff algebra), accountants (PLD / RDP-filter epsilon with
coalescing), calibration (sigma for a target, budget split), composition (parallel vs sequential from user ids),
tuning (Papernot & Steinke cost), ledger (write-ahead ledger.jsonl and the privacy filter), verify
(`dpalign privacy verify`). Schema: docs/ledger_schema.md.
"""
