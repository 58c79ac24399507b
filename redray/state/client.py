"""How the state API reaches a cluster: its Redis (the GCS) and, for what only nodes know
(workers, objects, logs), each node's raylet over an authenticated connection."""

from __future__ import annotations

import os
import threading
from typing import Any

from redray.core import context
from redray.gcs import DEFAULT_CLUSTER, URL_SCHEMES, Gcs
from redray.node import launch
from redray.transport.reactor import Reactor

DEFAULT_TIMEOUT_SECONDS = 30


class RayStateApiException(Exception):
    """A state API call could not be answered (Ray's name, ray.util.state.exception)."""


def connect(address: str | None = None, cluster: str | None = None) -> tuple[Gcs, bool]:
    """A GCS client for `address` (a Redis URL), or for the cluster this process is
    connected to, or the one `redray start` runs on this machine ("auto"/None); and whether
    the caller owns it (and closes it). RayStateApiException when there is none."""
    if address in (None, "", "auto"):
        worker = context.current
        if worker is not None and not worker.shutting_down:
            return worker.gcs, False
        address = os.environ.get("REDRAY_ADDRESS") or os.environ.get("RAY_ADDRESS") or None
        if address in (None, "", "auto"):
            record = launch.read_current_cluster()
            if record is None:
                raise RayStateApiException(
                    "No redray cluster to ask: call redray.init() first, start one with "
                    "`redray start --head`, or pass address='redis://HOST:PORT'."
                )
            address = record["gcs_url"]
            cluster = cluster or record.get("cluster")
    if "://" not in address:
        address = "redis://" + address
    if not address.startswith(URL_SCHEMES):
        raise ValueError(f"{address!r} is not a Redis URL (redis://[:PASSWORD@]HOST:PORT)")
    return Gcs(address, cluster or DEFAULT_CLUSTER), True


class NodeClient:
    """Requests to raylets ("state_query"), one connection per node, made on first use."""

    def __init__(self, gcs: Gcs):
        token = gcs.cluster_token()
        if token is None:
            raise RayStateApiException(f"No redray cluster {gcs.cluster!r} in this Redis.")
        self._gcs = gcs
        self._reactor = Reactor(token, name="redray-state")
        self._lock = threading.Lock()
        self._conns: dict[str, Any] = {}
        self._waiting: dict[int, list] = {}
        self._next_id = 0

    def _on_message(self, conn: Any, message: tuple) -> None:
        if message[0] == "reply":
            with self._lock:
                slot = self._waiting.pop(message[1], None)
            if slot is not None:
                slot.append(message[2])
                slot[0].set()

    def _on_closed(self, conn: Any) -> None:
        with self._lock:
            for node_id, known in list(self._conns.items()):
                if known is conn:
                    del self._conns[node_id]
            waiting = [slot for slot in self._waiting.values() if slot[1] is conn]
        for slot in waiting:
            slot[0].set()

    def _conn(self, node: dict[str, Any], timeout: float) -> Any:
        node_id = node["node_id"]
        with self._lock:
            conn = self._conns.get(node_id)
        if conn is not None and not conn.closed:
            return conn
        conn = self._reactor.connect(
            tuple(node["raylet_address"]), self._on_message, self._on_closed, timeout=timeout
        )
        with self._lock:
            self._conns[node_id] = conn
        return conn

    def query(self, node: dict[str, Any], kind: str, args: dict[str, Any], timeout: float) -> Any:
        """A raylet's answer; RayStateApiException when it cannot be had in time."""
        try:
            conn = self._conn(node, timeout)
        except OSError as exc:
            raise RayStateApiException(
                f"cannot reach the raylet of node {node['node_id']}: {exc}"
            ) from None
        done = threading.Event()
        slot: list = [done, conn]
        with self._lock:
            self._next_id += 1
            call_id = self._next_id
            self._waiting[call_id] = slot
        conn.send(("state_query", call_id, kind, args))
        if not done.wait(timeout) or len(slot) < 3:
            with self._lock:
                self._waiting.pop(call_id, None)
            raise RayStateApiException(
                f"node {node['node_id']} did not answer {kind!r} within {timeout:g} s"
            )
        result = slot[2]
        if isinstance(result, dict) and set(result) == {"error"}:
            raise RayStateApiException(f"node {node['node_id']}: {result['error']}")
        return result

    def close(self) -> None:
        self._reactor.stop("the state client is closed")


def live_nodes(gcs: Gcs) -> list[dict[str, Any]]:
    return [n for n in gcs.nodes() if n.get("alive") and n.get("raylet_address")]
