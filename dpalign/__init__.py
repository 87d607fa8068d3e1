"""Primitives shared by every layer of dpalign (config checks, statistics); imports nothing of the project."""
