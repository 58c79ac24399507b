"""Scheduling strategies, under Ray's module path and names."""

from __future__ import annotations

from typing import Any


class NodeAffinitySchedulingStrategy:
    """Run on the node with `node_id` (hex); with soft=True fall back to others."""

    def __init__(
        self,
        node_id: str,
        soft: bool,
        _spill_on_unavailable: bool = False,
        _fail_on_unavailable: bool = False,
    ):
        if not isinstance(node_id, str):
            raise TypeError("node_id must be the node's id as a hex string")
        self.node_id = node_id
        self.soft = soft
        self._spill_on_unavailable = _spill_on_unavailable
        self._fail_on_unavailable = _fail_on_unavailable

    def wire(self) -> dict[str, Any]:
        return {"type": "node_affinity", "node_id": self.node_id, "soft": self.soft}

    def __repr__(self) -> str:
        return f"NodeAffinitySchedulingStrategy(node_id={self.node_id!r}, soft={self.soft})"


class PlacementGroupSchedulingStrategy:
    """Run inside a placement group's bundle (-1: any bundle)."""

    def __init__(
        self,
        placement_group: Any,
        placement_group_bundle_index: int = -1,
        placement_group_capture_child_tasks: bool | None = None,
    ):
        self.placement_group = placement_group
        self.placement_group_bundle_index = placement_group_bundle_index
        self.placement_group_capture_child_tasks = placement_group_capture_child_tasks

    def wire(self) -> dict[str, Any]:
        return {
            "type": "placement_group",
            "pg_id": self.placement_group.id.hex() if self.placement_group else None,
            "bundle_index": self.placement_group_bundle_index,
            "capture": bool(self.placement_group_capture_child_tasks),
        }

    def __repr__(self) -> str:
        return (
            "PlacementGroupSchedulingStrategy("
            f"{self.placement_group!r}, {self.placement_group_bundle_index})"
        )


def check_strategy(strategy: Any) -> None:
    if strategy in (None, "DEFAULT", "SPREAD"):
        return
    if isinstance(strategy, (NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy)):
        return
    if not isinstance(strategy, str):
        raise TypeError(
            "The type of keyword 'scheduling_strategy' must be None, a str, "
            "NodeAffinitySchedulingStrategy or PlacementGroupSchedulingStrategy, "
            f"but received type {type(strategy)}"
        )
    raise ValueError(
        f"Invalid scheduling_strategy {strategy!r}: use 'DEFAULT', 'SPREAD', "
        "NodeAffinitySchedulingStrategy or PlacementGroupSchedulingStrategy."
    )


def wire(strategy: Any) -> Any:
    """A strategy as sent to raylets: None, 'SPREAD', or a dict."""
    if strategy in (None, "DEFAULT"):
        return None
    if strategy == "SPREAD":
        return "SPREAD"
    return strategy.wire()
