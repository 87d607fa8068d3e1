"""Primitives shared by every layer of dpalign (config checks, statistics); imports nothing of the project."""

__version__ = "0.1.0"
"""The package version (pyproject.toml reads it from here: one place to bump it)."""
