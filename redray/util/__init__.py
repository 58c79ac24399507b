"""Utilities under Ray's module paths: ActorPool, queue, placement groups, strategies."""

from typing import Any


def list_named_actors(all_namespaces: bool = False) -> list:
    """Names of live named actors in this namespace (or, with all_namespaces, every one)."""
    from redray.actor import list_named_actors as names

    return names(all_namespaces)


def __getattr__(name: str) -> Any:
    # ActorPool and placement groups are imported on first use, keeping `import redray` light.
    if name == "ActorPool":
        from redray.util.actor_pool import ActorPool

        return ActorPool
    raise AttributeError(f"module 'redray.util' has no attribute {name!r}")


__all__ = ["ActorPool", "list_named_actors"]
