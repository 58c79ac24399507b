"""Ray's list filters: `[(key, "=" | "!=", value), ...]`, checked at the call site."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

PREDICATES = ("=", "!=")
# Columns compared without regard to case (Ray upper-cases state names the same way).
CASE_INSENSITIVE = {"state", "status", "type", "worker_type", "reference_type", "task_status"}

Filter = tuple[str, str, Any]


def check(filters: Iterable[Any] | None, schema: type, limit: int) -> list[Filter]:
    """The filters as (key, predicate, value) triples; ValueError for an unknown column or
    predicate, a malformed filter, or a limit that is not a positive integer."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    columns = [f.name for f in dataclasses.fields(schema)]
    checked: list[Filter] = []
    for item in filters or ():
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise ValueError(f"a filter is a (key, predicate, value) tuple, got {item!r}")
        key, predicate, value = item
        if key not in columns:
            raise ValueError(
                f"Given filter column {key} is not supported. Enter filters with one of: "
                f"{', '.join(columns)}"
            )
        if predicate not in PREDICATES:
            raise ValueError(
                f"Unsupported filter predicate {predicate!r}: use one of {', '.join(PREDICATES)}"
            )
        checked.append((key, predicate, value))
    return checked


def _norm(key: str, value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = ""
    else:
        text = str(value)
    return text.upper() if key in CASE_INSENSITIVE else text


def normalized(key: str, value: Any) -> str:
    """A filter value as it is compared (and as indexes are keyed)."""
    return _norm(key, value)


def matches(record: Any, filters: list[Filter]) -> bool:
    for key, predicate, value in filters:
        equal = _norm(key, getattr(record, key, None)) == _norm(key, value)
        if equal != (predicate == "="):
            return False
    return True
