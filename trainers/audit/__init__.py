"""Audits of the DP engine: white-box gradient canaries (``whitebox``) and planted bugs (``planted``, tests only)."""
