"""Pieces every engine's name rules share; each engine passes in its own validators."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from coffer.errors import ValidationError


def collect_names(entries: Any, validate: Callable[[Any], str], field: str) -> list[str]:
    """Names from Trove's ``[{"name": ...}]`` (plain strings accepted too), each validated by
    ``validate``, duplicates dropped, order kept."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ValidationError(f"The {field} must be a list of objects with a 'name'.")
    names: list[str] = []
    for entry in entries:
        name = validate(entry.get("name") if isinstance(entry, Mapping) else entry)
        if name not in names:
            names.append(name)
    return names
