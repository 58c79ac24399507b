"""Utilities under Ray's module paths: ActorPool, queue, placement groups, strategies."""

import socket
from typing import Any

from redray.core import context
from redray.util.check_serialize import inspect_serializability
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


def get_node_ip_address(address: str = "8.8.8.8:53") -> str:
    """The IP address of this process's node: the one the cluster knows it by when redray
    runs here, else the address this machine would reach `address` from (no packet is
    sent)."""
    worker = context.current
    if worker is not None and worker.node.get("node_ip_address"):
        return worker.node["node_ip_address"]
    host, _, port = address.rpartition(":")
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((host, int(port)))
        return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()


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
    "get_node_ip_address",
    "get_placement_group",
    "inspect_serializability",
    "list_named_actors",
    "placement_group",
    "placement_group_table",
    "remove_placement_group",
]
