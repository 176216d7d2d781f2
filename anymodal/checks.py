"""Checks of single config and settings values, shared by every dataclass that validates itself."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping


def positive_int(name: str, value: Any, *, allow_none: bool = False, limit: int | None = None) -> None:
    """Raise unless ``value`` is an integer > 0 (and <= ``limit``); ``None`` passes with ``allow_none``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if limit is not None and value > limit:
        raise ValueError(f"{name} must be at most {limit}, got {value!r}")


def positive_number(name: str, value: Any, *, limit: float | None = None) -> None:
    """Raise unless ``value`` is a finite number > 0 (and <= ``limit``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if limit is not None and value > limit:
        raise ValueError(f"{name} must be at most {limit:g}, got {value!r}")


def check_keys(where: str, spec: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Raise a ``ValueError`` naming the first unknown key of ``spec`` and listing the allowed ones."""
    allowed = set(allowed)
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
