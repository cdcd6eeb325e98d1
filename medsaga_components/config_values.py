"""Values as bundle configs and their command lines give them.

``python -m monai.bundle run ... --key False`` reaches the config as the bool False (Python
Fire reads Python literals), but ``--key false`` arrives as the string ``"false"``, which
Python reads as true: a switch turned off on the command line would silently stay on. Every
component that takes a switch reads it through :func:`as_bool`.
"""

from __future__ import annotations

from typing import Any


def as_bool(value: Any, key: str) -> bool:
    """``value`` as a bool: a bool, ``"true"``/``"false"`` in any case, or 0/1; anything else is
    an error naming ``key``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{key} must be true or false, got {value!r}")
