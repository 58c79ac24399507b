"""Ray's `ray.util.metrics`: Counter, Gauge and Histogram that tasks, actors and drivers
record, aggregated in the process and written to Redis in batches (see
redray/state/metrics.py); read with `redray list metrics` or `read_metrics`."""

from __future__ import annotations

import re
from typing import Any

from redray.state.metrics import registry

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


class Metric:
    """What every metric has: a name, a description, tag keys and default tags."""

    _kind = ""

    def __init__(
        self,
        name: str,
        description: str = "",
        tag_keys: tuple[str, ...] | None = None,
        _boundaries: list[float] | None = None,
    ):
        if not name or not isinstance(name, str):
            raise ValueError("Empty name is not allowed. Please provide a metric name.")
        if not _NAME.match(name):
            raise ValueError(
                f"Invalid metric name {name!r}: use letters, digits, '_' and ':', not starting "
                "with a digit."
            )
        if tag_keys is None:
            tag_keys = ()
        if not isinstance(tag_keys, tuple):
            raise TypeError(f"tag_keys should be a tuple type, got: {type(tag_keys)}")
        for key in tag_keys:
            if not isinstance(key, str):
                raise TypeError(f"Tag keys must be str, got {type(key)}.")
        self._name = name
        self._description = description
        self._tag_keys = tag_keys
        self._default_tags: dict[str, str] = {}
        self._series = registry.register(self._kind, name, description, tag_keys, _boundaries)

    def set_default_tags(self, default_tags: dict[str, str]) -> Metric:
        """Tags used when a call does not give them (returns the metric, as Ray's does)."""
        for key, value in default_tags.items():
            if key not in self._tag_keys:
                raise ValueError(f"Unrecognized tag key {key}.")
            if not isinstance(value, str):
                raise TypeError(f"Tag values must be str, got {type(value)}.")
        self._default_tags = dict(default_tags)
        return self

    @property
    def info(self) -> dict[str, Any]:
        return {
            "name": self._name,
            "description": self._description,
            "tag_keys": self._tag_keys,
            "default_tags": self._default_tags,
        }

    def _tags(self, tags: dict[str, str] | None) -> tuple:
        merged = {**self._default_tags, **(tags or {})}
        for key, value in merged.items():
            if key not in self._tag_keys:
                raise ValueError(f"Unrecognized tag key {key}.")
            if not isinstance(value, str):
                raise TypeError(f"Tag values must be str, got {type(value)}.")
        missing = [k for k in self._tag_keys if k not in merged]
        if missing:
            raise ValueError(f"Missing value for tag key(s): {','.join(missing)}.")
        return tuple(merged[k] for k in self._tag_keys)

    @staticmethod
    def _number(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"metric values must be numbers, got {type(value).__name__}")
        return float(value)


class Counter(Metric):
    """A cumulative count (only goes up)."""

    _kind = "counter"

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        value = self._number(value)
        if value <= 0:
            raise ValueError(f"value must be >0, got {value}")
        self._series.record(self._tags(tags), value)


class Gauge(Metric):
    """A value that is set (goes up and down)."""

    _kind = "gauge"

    def set(self, value: float | None, tags: dict[str, str] | None = None) -> None:
        if value is None:
            return
        self._series.record(self._tags(tags), self._number(value))


class Histogram(Metric):
    """Observations counted in buckets with the given upper boundaries."""

    _kind = "histogram"

    def __init__(
        self,
        name: str,
        description: str = "",
        boundaries: list[float] | None = None,
        tag_keys: tuple[str, ...] | None = None,
    ):
        if not boundaries:
            raise ValueError("boundaries must be provided and non-empty for a Histogram.")
        for boundary in boundaries:
            if isinstance(boundary, bool) or not isinstance(boundary, (int, float)):
                raise TypeError(f"boundaries must be numbers, got {boundary!r}")
            if boundary <= 0:
                raise ValueError(
                    "Invalid `boundaries` argument: every boundary must be greater than 0, "
                    f"got {boundaries}"
                )
        if list(boundaries) != sorted(boundaries):
            raise ValueError(f"boundaries must be in increasing order, got {boundaries}")
        self.boundaries = list(boundaries)
        super().__init__(name, description, tag_keys, self.boundaries)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._series.record(self._tags(tags), self._number(value))

    @property
    def info(self) -> dict[str, Any]:
        return {**super().info, "boundaries": self.boundaries}


__all__ = ["Counter", "Gauge", "Histogram", "Metric"]
