"""Data: the embedded review task, the gold oracle, stage splits by user, loading and validation."""
