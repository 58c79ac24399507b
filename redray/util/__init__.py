"""Utilities under Ray's module paths: ActorPool, queue, placement groups, strategies."""

from typing import Any

from redray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)


def list_named_actors(all_namespaces: bool = False) -> list:
    """Names of live named actors in this namespace (or, with all_namespaces, every one)."""
    from redray.actor import list_named_actors as names

    return names(all_namespaces)


def __getattr__(name: str) -> Any:
    # ActorPool and queue are imported on first use, keeping `import redray` light.
    if name == "ActorPool":
        from redray.util.actor_pool import ActorPool

        return ActorPool
    if name in ("queue", "state", "metrics"):
        import importlib

        return importlib.import_module(f"redray.util.{name}")
    raise AttributeError(f"module 'redray.util' has no attribute {name!r}")


__all__ = [
    "ActorPool",
    "PlacementGroup",
    "get_current_placement_group",
    "get_placement_group",
    "list_named_actors",
    "placement_group",
    "placement_group_table",
    "remove_placement_group",
]
