"""Config primitives every layer may use: the error type, the check helper, plain-data views and content hashes.

They live at the bottom of the package graph (this module imports nothing of the project) so that a component's
config dataclass (``trainers/*/config.py``, ``controller/config.py``, ``cluster/config.py``) can validate itself
without importing the launcher, which sits on top and assembles those dataclasses (``launch/schema.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range.

    The message always names the dotted field and says what is allowed.
    """


def require(condition: bool, field: str, message: str) -> None:
    """Raise a ConfigError for ``field`` unless ``condition`` holds (used in ``check`` methods)."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data view of a config (for YAML/JSON dumps and hashing)."""
    return dataclasses.asdict(cfg)


def config_hash(*parts: Any, length: int = 16) -> str:
    """Stable content hash of config sections (dataclasses or plain data): keys the artifact caches."""
    payload = [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
