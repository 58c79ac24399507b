"""Placement-group reservation, run by the leader's control loop.

A group is placed all or nothing: the loop plans a node for each bundle from the nodes'
reported free resources, asks each chosen raylet to *prepare* (set aside) its bundles, and
only when every raylet agreed tells them to *commit* (turn the bundles into the group's
resources). If any raylet refuses, the prepared ones are cancelled and the group stays
pending; pending groups are tried again every tick, so one that fits nowhere is placed as
soon as a node that fits joins.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redray import scheduling
from redray.gcs import NAMED_PGS

if TYPE_CHECKING:
    from redray.control import ControlLoop
    from redray.reactor import Connection

log = logging.getLogger("redray.control")

NODE_VIEW_SECONDS = 0.5


@dataclass
class _Group:
    pg_id: str
    info: dict[str, Any]
    attempt: int = 0
    busy: bool = False  # a prepare round is in flight
    refused: bool = False  # the last round was refused: plan from a fresh view
    replies: dict[str, Any] = field(default_factory=dict)


class PlacementGroupManager:
    """The placement groups of the cluster (leader only; state mirrored in the GCS)."""

    def __init__(self, control: ControlLoop):
        self.control = control
        self.groups: dict[str, _Group] = {}
        self._node_view: list[dict[str, Any]] = []
        self._nodes_read = float("-inf")

    # -- requests ---------------------------------------------------------------------------
    def create(self, pg_id: str, info: dict[str, Any]) -> None:
        if pg_id in self.groups:
            return
        group = self.groups[pg_id] = _Group(pg_id, info)
        self._place(group)

    def remove(self, pg_id: str) -> None:
        group = self.groups.pop(pg_id, None)
        if group is None:
            info = self.control.gcs.placement_group(pg_id)
            if info is None or info.get("state") == "REMOVED":
                return
            group = _Group(pg_id, info)
        group.attempt += 1  # ignore replies of a prepare round still in flight
        # Every node hears of it: those holding bundles free them, all fail requests for it.
        for node in self._nodes():
            if node["alive"]:
                self._send(node["node_id"], ("pg_remove", pg_id))
        name = group.info.get("name")
        if name:  # free first: whoever sees it removed may at once reuse the name
            self.control.gcs.release_name(NAMED_PGS, group.info.get("namespace", ""), name, pg_id)
        self._publish(group, state="REMOVED")
        self.control.kill_actors_in_group(pg_id)

    def owner_died(self, worker_hex: str) -> None:
        for group in list(self.groups.values()):
            if group.info.get("owner") == worker_hex and not group.info.get("detached"):
                self.remove(group.pg_id)

    def retry_pending(self) -> None:
        for group in list(self.groups.values()):
            if group.info.get("state") == "PENDING" and not group.busy:
                self._place(group)

    def adopt(self) -> None:
        """On taking over: pending groups are placed again by this leader."""
        for pg_id, info in self.control.gcs.table_all("pgs").items():
            if info.get("state") in ("PENDING", "CREATED") and pg_id not in self.groups:
                self.groups[pg_id] = _Group(pg_id, info)

    # -- two-phase reservation --------------------------------------------------------------
    def _nodes(self, fresh: bool = False) -> list[dict[str, Any]]:
        """Live nodes with their free resources, read at most every NODE_VIEW_SECONDS.

        A stale view only costs a refused prepare (raylets check their real resources), after
        which the next attempt reads a fresh one."""
        now = time.monotonic()
        if fresh or now - self._nodes_read > NODE_VIEW_SECONDS:
            self._node_view = [n for n in self.control.gcs.nodes() if n["alive"]]
            self._nodes_read = now
        return self._node_view

    def _place(self, group: _Group) -> None:
        nodes = self._nodes(fresh=group.refused)
        plan = scheduling.plan_bundles(
            group.info["bundles"],
            group.info["strategy"],
            [(n["node_id"], n.get("available", {})) for n in nodes],
        )
        if plan is None:
            return  # stays pending; tried again on the next tick
        addresses = {n["node_id"]: n["raylet_address"] for n in nodes}
        by_node: dict[str, list[tuple[int, dict]]] = {}
        for index, node_id in enumerate(plan):
            by_node.setdefault(node_id, []).append((index, group.info["bundles"][index]))
        group.attempt += 1
        group.busy = True
        group.replies = {}
        attempt = group.attempt
        for node_id, bundles in by_node.items():

            def on_reply(reply: Any, node_id: str = node_id) -> None:
                self.control.post(self._on_prepared, group, attempt, node_id, plan, by_node, reply)

            self._call(node_id, addresses[node_id], ("pg_prepare", group.pg_id, bundles), on_reply)

    def _on_prepared(self, group, attempt, node_id, plan, by_node, reply) -> None:
        if attempt != group.attempt:
            if reply is True:
                self._send(node_id, ("pg_cancel", group.pg_id))
            return
        group.replies[node_id] = reply
        if len(group.replies) < len(by_node):
            return
        group.busy = False
        agreed = [n for n, ok in group.replies.items() if ok is True]
        if len(agreed) < len(by_node):
            for node in agreed:
                self._send(node, ("pg_cancel", group.pg_id))
            group.replies = {}
            if not group.refused:
                group.refused = True
                self._place(group)  # once more at once, from a fresh view
            return
        group.refused = False
        for node in agreed:
            self._send(node, ("pg_commit", group.pg_id))
        self._publish(group, state="CREATED", bundle_nodes=plan)

    # -- plumbing ---------------------------------------------------------------------------
    def _publish(self, group: _Group, **changes: Any) -> None:
        group.info.update(changes)
        group.info["seq"] = group.info.get("seq", 0) + 1
        self.control.gcs.update_placement_group(group.pg_id, group.info)

    def _raylet(self, node_id: str, address: Any, then: Any) -> None:
        client = self.control.client
        if node_id == self.control.raylet.node_id:
            then(client.raylet)
        else:
            client.submitter.connect_raylet(node_id, address, then)

    def _call(self, node_id: str, address: Any, message: tuple, on_reply: Any) -> None:
        def send(conn: Connection | None) -> None:
            if conn is None:
                on_reply(False)
            else:
                self.control.client.call_async(conn, message[0], message[1:], on_reply)

        self._raylet(node_id, address, send)

    def _send(self, node_id: str, message: tuple) -> None:
        if node_id == self.control.raylet.node_id:
            self.control.client.raylet.send(message)
        else:
            self.control.client.submitter.send_to_raylet(node_id, message)
