"""Placement-group reservation, run by the leader's control loop.

A group is placed all or nothing: the loop plans a node for each bundle from the nodes'
reported free resources, asks each chosen raylet to *prepare* (set aside) its bundles, and
only when every raylet agreed tells them to *commit* (turn the bundles into the group's
resources). If any raylet refuses, the prepared ones are cancelled and the group stays
pending; pending groups are tried again every tick, so one that fits nowhere is placed as
soon as a node that fits joins. A group planned onto one node needs no second phase: that
node reserves and commits it in one step. The loop's own node (it runs in the head's raylet
process) is asked directly on the raylet's reactor thread, not over a socket.

State changes are announced in bursts: the control loop writes what it decided while events
were queued in one Redis round trip, once the queue is empty (see `flush`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redray.control.tenure import Tenure
from redray.gcs import NAMED_PGS
from redray.node import scheduling
from redray.transport.connection import Connection

log = logging.getLogger(__name__)

NODE_VIEW_SECONDS = 0.5
MAX_BATCHED_WRITES = 256  # state changes written in one round trip at most


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

    def __init__(self, tenure: Tenure, kill_actors_in_group: Callable[[str], None]):
        self.tenure = tenure
        self.gcs = tenure.gcs
        self.host = tenure.host
        self.post = tenure.post  # run a function on the control loop's thread
        self.kill_actors_in_group = kill_actors_in_group
        self.groups: dict[str, _Group] = {}
        self._node_view: list[dict[str, Any]] = []
        self._nodes_read = float("-inf")
        self._writes: list[tuple[str, dict[str, Any]]] = []

    # -- requests ---------------------------------------------------------------------------
    def create(self, pg_id: str, info: dict[str, Any]) -> None:
        if pg_id in self.groups:
            return
        group = self.groups[pg_id] = _Group(pg_id, info)
        waiting = (g for g in self.groups.values() if g is not group and not g.busy)
        if any(self._pending(other) for other in waiting):
            return  # older groups wait for room: it is placed after them (retry_pending)
        self._place(group)

    def remove(self, pg_id: str) -> None:
        group = self.groups.pop(pg_id, None)
        if group is None:
            info = self.gcs.placement_group(pg_id)
            if info is None or info.get("state") == "REMOVED":
                return
            group = _Group(pg_id, info)
        group.attempt += 1  # ignore replies of a prepare round still in flight
        # Every node hears of it: those holding bundles free them, all fail requests for it.
        for node in self._nodes():
            if node["alive"]:
                self._send(node["node_id"], "pg_remove", pg_id)
        name = group.info.get("name")
        if name:  # free first: whoever sees it removed may at once reuse the name
            self.gcs.release_name(NAMED_PGS, group.info.get("namespace", ""), name, pg_id)
        self._publish(group, state="REMOVED")
        self.kill_actors_in_group(pg_id)

    def owner_died(self, worker_hex: str) -> None:
        for group in list(self.groups.values()):
            if group.info.get("owner") == worker_hex and not group.info.get("detached"):
                self.remove(group.pg_id)

    def retry_pending(self) -> None:
        """Place pending groups in the order they were created, as Ray does: a group that
        could fit the cluster but not now holds back the younger ones (else a stream of
        small groups could starve it); one that can never fit does not."""
        for group in list(self.groups.values()):
            if not self._pending(group) or group.busy or self._place(group):
                continue
            if self._feasible(group):
                return

    @staticmethod
    def _pending(group: _Group) -> bool:
        return group.info.get("state") == "PENDING"

    def _feasible(self, group: _Group) -> bool:
        """Whether the group fits the live nodes' total resources (empty, as it were)."""
        totals = [
            (n["node_id"], scheduling.without_groups(n.get("resources", {}))) for n in self._nodes()
        ]
        plan = scheduling.plan_bundles(group.info["bundles"], group.info["strategy"], totals)
        return plan is not None

    @property
    def client(self) -> Any:
        return self.tenure.client

    def drop(self) -> None:
        """The tenure ended: forget every group (a successor adopts them from the table);
        replies of rounds in flight find their group gone and undo what they reserved."""
        self.groups = {}
        self._writes = []

    def adopt(self) -> None:
        """On taking over: pending groups are placed again by this leader."""
        for pg_id, info in self.gcs.table_all("pgs").items():
            if info.get("state") in ("PENDING", "CREATED") and pg_id not in self.groups:
                self.groups[pg_id] = _Group(pg_id, info)

    # -- two-phase reservation --------------------------------------------------------------
    def _nodes(self, fresh: bool = False) -> list[dict[str, Any]]:
        """Live nodes with their free resources, read at most every NODE_VIEW_SECONDS.

        A stale view only costs a refused prepare (raylets check their real resources), after
        which the next attempt reads a fresh one."""
        now = time.monotonic()
        if fresh or now - self._nodes_read > NODE_VIEW_SECONDS:
            self._node_view = [n for n in self.gcs.nodes() if n["alive"]]
            for node in self._node_view:  # bundles ask for plain resources only
                node["available"] = scheduling.without_groups(node.get("available", {}))
            self._nodes_read = now
        return self._node_view

    def _place(self, group: _Group) -> bool:
        """Ask the planned nodes to set the group's bundles aside (False: it fits nowhere
        now). A group planned onto one node is reserved and committed there in one step (all
        or nothing holds trivially)."""
        nodes = self._nodes(fresh=group.refused)
        plan = scheduling.plan_bundles(
            group.info["bundles"],
            group.info["strategy"],
            [(n["node_id"], n.get("available", {})) for n in nodes],
        )
        if plan is None:
            return False  # stays pending; tried again on the next tick
        addresses = {n["node_id"]: n["raylet_address"] for n in nodes}
        views = {n["node_id"]: n.setdefault("available", {}) for n in nodes}
        by_node: dict[str, list[tuple[int, dict]]] = {}
        for index, node_id in enumerate(plan):
            bundle = group.info["bundles"][index]
            by_node.setdefault(node_id, []).append((index, bundle))
            for name, amount in bundle.items():  # the next plans see it taken
                views[node_id][name] = views[node_id].get(name, 0.0) - amount
        group.attempt += 1
        group.busy = True
        group.replies = {}
        attempt = group.attempt
        one_step = len(by_node) == 1
        for node_id, bundles in by_node.items():

            def on_reply(reply: Any, node_id: str = node_id) -> None:
                self.post(self._on_prepared, group, attempt, node_id, plan, by_node, reply)

            self._reserve(node_id, addresses[node_id], group.pg_id, bundles, one_step, on_reply)
        return True

    def _on_prepared(self, group, attempt, node_id, plan, by_node, reply) -> None:
        one_step = len(by_node) == 1
        if attempt != group.attempt or self.groups.get(group.pg_id) is not group:
            # The group was removed meanwhile, or the tenure that placed it ended.
            if reply is True:
                self._send(node_id, "pg_remove" if one_step else "pg_cancel", group.pg_id)
            return
        group.replies[node_id] = reply
        if len(group.replies) < len(by_node):
            return
        group.busy = False
        agreed = [n for n, ok in group.replies.items() if ok is True]
        if len(agreed) < len(by_node):
            for node in agreed:
                self._send(node, "pg_cancel", group.pg_id)
            group.replies = {}
            if not group.refused:
                group.refused = True
                self._place(group)  # once more at once, from a fresh view
            return
        group.refused = False
        if not one_step:
            for node in agreed:
                self._send(node, "pg_commit", group.pg_id)
        self._publish(group, state="CREATED", bundle_nodes=plan)

    # -- plumbing ---------------------------------------------------------------------------
    def _publish(self, group: _Group, **changes: Any) -> None:
        """Record and announce a state change; written with the others of this burst."""
        group.info.update(changes)
        group.info["seq"] = group.info.get("seq", 0) + 1
        self._writes.append((group.pg_id, dict(group.info)))
        if len(self._writes) >= MAX_BATCHED_WRITES:
            self.flush()

    def flush(self) -> None:
        """Write the state changes collected so far, in order, in one round trip."""
        if self._writes:
            writes, self._writes = self._writes, []
            self.gcs.update_placement_groups(writes, fence=self.tenure.require())

    def _reserve(
        self, node_id: str, address: Any, pg_id: str, bundles: list, commit: bool, on_reply: Any
    ) -> None:
        """Ask a node to set bundles aside (and commit them); on_reply(True) if it did.

        The control loop lives in the head's raylet process: its own node is asked
        directly on the raylet's reactor thread, other nodes over their connection."""
        host = self.host
        if node_id == host.node_id:
            host.reactor.call_soon(lambda: on_reply(host.reserve_bundles(pg_id, bundles, commit)))
            return

        def send(conn: Connection | None) -> None:
            if conn is None:
                on_reply(False)
            else:
                message = (pg_id, bundles, commit)
                self.client.peers.call_async(conn, "pg_reserve", message, on_reply)

        self.client.peers.connect_raylet(node_id, address, send)

    def _send(self, node_id: str, kind: str, pg_id: str) -> None:
        """Tell a node to commit, cancel or remove the group's bundles."""
        host = self.host
        if node_id == host.node_id:
            action = {
                "pg_commit": host.commit_bundles,
                "pg_cancel": host.cancel_bundles,
                "pg_remove": host.remove_bundles,
            }[kind]
            host.reactor.call_soon(action, pg_id)
        else:
            self.client.peers.send_to_raylet(node_id, (kind, pg_id))
