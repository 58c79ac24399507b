"""The actors of the cluster, as the leader's control loop manages them.

The leader places an actor by leasing a worker like any owner would, sends it the creation
spec, and watches its process through a connection to it: the connection's close is the
process's death. Then it restarts the actor (up to `max_restarts`) or records its death. It
kills actors on request, when their owner dies, when their placement group goes, and ends
them gracefully once nothing refers to them (they finish the calls they accepted first).

Every state change is written (fenced) before the loop acts on it: a leader whose tenure
ended learns so from the refused write and does nothing more. Actors belong to one tenure:
when it ends they are marked stale, and the replies still coming for them only give back
what they hold (a lease, a worker) instead of acting.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from redray import gcs as gcs_schema
from redray.control.tenure import Tenure
from redray.core.peers import CONNECTION_LOST
from redray.gcs import NotLeaderError
from redray.transport.connection import Connection

log = logging.getLogger(__name__)

# An actor ended gracefully (its last reference is gone) is killed if it has not finished the
# calls it accepted within this time (Ray: actor_graceful_shutdown_timeout_ms).
GRACEFUL_EXIT_SECONDS = float(os.environ.get("REDRAY_ACTOR_GRACEFUL_SHUTDOWN_TIMEOUT_S", "30"))
OUT_OF_SCOPE = "The actor is dead because all references to the actor were removed."
RESCHEDULE_SECONDS = 0.5


@dataclass(eq=False)
class _Actor:
    actor_id: str
    info: dict[str, Any]
    spec: bytes
    conn: Connection | None = None
    lease: tuple | None = None  # (raylet connection, lease id)
    grant: dict[str, Any] | None = None  # what the worker's lease gave it (GPU ids, group)
    kill_reason: str | None = None  # set when it is being killed on purpose, no restart
    exit_reason: str | None = None  # set when it exits on purpose (__ray_terminate__)
    attempt: int = 0
    stale: bool = False  # its tenure ended: replies for it only give back what it holds
    extra: dict[str, Any] = field(default_factory=dict)


class ActorManager:
    """The leader's actors (control thread only)."""

    def __init__(self, tenure: Tenure):
        self.tenure = tenure
        self.gcs = tenure.gcs
        self.actors: dict[str, _Actor] = {}
        # Actors asked to finish their calls and exit: id -> (deadline, its connection then).
        self.terminating: dict[str, tuple[float, Any]] = {}

    @property
    def client(self) -> Any:
        return self.tenure.client

    def adopt(self) -> None:
        """A tenure begins: carry on with every actor that is not dead."""
        for actor_id, info in self.gcs.table_all(gcs_schema.ACTORS).items():
            if info.get("state") == "DEAD" or actor_id in self.actors:
                continue
            spec = self.gcs.actor_spec(actor_id)
            if spec is None:
                continue
            actor = self.actors[actor_id] = _Actor(actor_id, info, spec)
            if info.get("state") == "ALIVE" and info.get("address"):
                self.tenure.post(self._reconnect, actor)
            else:
                self.tenure.post(self._schedule, actor)

    def drop(self) -> None:
        """The tenure ended: forget every actor (a successor adopts them from the table)."""
        for actor in self.actors.values():
            actor.stale = True
        self.actors = {}
        self.terminating = {}

    # -- requests ---------------------------------------------------------------------------
    def create(self, actor_id: str) -> None:
        if actor_id in self.actors:
            return  # already being placed (adopted from the table when we took over)
        info = self.gcs.actor(actor_id)
        spec = self.gcs.actor_spec(actor_id)
        if info is None or spec is None or info.get("state") == "DEAD":
            return
        actor = self.actors[actor_id] = _Actor(actor_id, info, spec)
        self._schedule(actor)

    def kill_request(self, actor_id: str, no_restart: bool) -> None:
        actor = self.actors.get(actor_id)
        if actor is not None:
            self._kill(actor, "The actor was killed by ray.kill()." if no_restart else None)

    def out_of_scope(self, actor_id: str) -> None:
        """Its owner holds no reference to it any more (nor does anyone it lent one to)."""
        actor = self.actors.get(actor_id)
        if actor is None or actor.info.get("detached"):
            return
        if actor.info.get("state") == "ALIVE" and actor.conn is not None:
            self._terminate(actor, OUT_OF_SCOPE)
        else:
            self._kill(actor, OUT_OF_SCOPE)

    def kill_in_group(self, pg_id: str) -> None:
        for actor in list(self.actors.values()):
            strategy = actor.info.get("strategy")
            if isinstance(strategy, dict) and strategy.get("pg_id") == pg_id:
                self._kill(actor, "The actor's placement group was removed.")

    def process_died(self, worker_id_hex: str) -> None:
        """A driver or worker died: an actor it was dies with it; what it owned (unless
        detached) is killed."""
        for actor in list(self.actors.values()):
            address = actor.info.get("address")
            if address and address[2] == worker_id_hex and actor.conn is not None:
                # The actor's own process exited (its socket may live on in a child).
                conn, actor.conn = actor.conn, None
                conn.close()
                self._actor_gone(actor)
        for actor in list(self.actors.values()):
            owner = actor.info.get("owner") or ["", 0, ""]
            if owner[2] == worker_id_hex and not actor.info.get("detached"):
                self._kill(actor, "The actor is dead because its owner has died.")

    def note_exit(self, actor_id: str, reason: str) -> None:
        actor = self.actors.get(actor_id)
        if actor is not None:
            actor.exit_reason = f"The actor exited on purpose: {reason}."

    def _terminate(self, actor: _Actor, reason: str) -> None:
        """End the actor gracefully, as Ray does for one out of scope: it refuses new calls,
        finishes those it accepted (from any caller), then exits; killed if that takes
        longer than GRACEFUL_EXIT_SECONDS."""
        actor.kill_reason = reason  # its death, however it comes: no restart, this cause
        self.terminating[actor.actor_id] = (time.monotonic() + GRACEFUL_EXIT_SECONDS, actor.conn)
        actor.conn.send(("actor_terminate", reason))

    def kill_overdue_exits(self) -> None:
        now = time.monotonic()
        for actor_id, (deadline, conn) in list(self.terminating.items()):
            actor = self.actors.get(actor_id)
            if actor is None or actor.conn is not conn:
                del self.terminating[actor_id]  # it exited (or its process died)
            elif now >= deadline:
                del self.terminating[actor_id]
                log.warning(
                    "actor %s did not finish its calls within %s s of being ended: killing it",
                    actor_id,
                    GRACEFUL_EXIT_SECONDS,
                )
                self._kill(actor, actor.kill_reason)

    # -- placing ----------------------------------------------------------------------------
    def _schedule(self, actor: _Actor, raylet: Connection | None = None) -> None:
        """Ask a raylet for a worker that fits the actor (following spillback)."""
        if actor.stale:
            return
        info = actor.info
        request = {
            "resources": info.get("placement_resources") or {},
            "env_vars": info.get("env_vars") or {},
            "runtime_env": info.get("runtime_env"),
            "strategy": info.get("strategy"),
            "name": info.get("class_name", "actor"),
            "actor": True,
            "epoch": self.tenure.require().epoch,
            "spilled": raylet is not None,
        }
        raylet = raylet or self.client.raylet
        actor.attempt += 1
        attempt = actor.attempt
        self.client.peers.call_async(
            raylet,
            "lease",
            (request,),
            lambda reply: self.tenure.post(self._on_lease, actor, raylet, attempt, reply),
        )

    def _on_lease(self, actor: _Actor, raylet: Connection, attempt: int, reply: Any) -> None:
        if reply is CONNECTION_LOST:
            self._schedule_later(actor)  # that raylet died: try again from ours
            return
        kind = reply[0]
        if kind == "stale":
            raise NotLeaderError()  # the raylet heard from a newer leader: our tenure is over
        if actor.stale or actor.kill_reason is not None or attempt != actor.attempt:
            if kind == "granted":
                raylet.send(("lease_return", reply[1], True))
            if actor.kill_reason is not None and not actor.stale:
                self._set_dead(actor, actor.kill_reason)
            return
        if kind == "granted":
            _, lease_id, address, grant = reply
            actor.lease = (raylet, lease_id)
            actor.grant = grant
            self.client.peers.peer_async(
                tuple(address),
                lambda conn: self.tenure.post(
                    self._on_worker, actor, address, conn, attempt, (raylet, lease_id)
                ),
            )
        elif kind == "spillback":
            _, node_id, raylet_address = reply
            self.client.peers.connect_raylet(
                node_id,
                raylet_address,
                lambda conn: (
                    self.tenure.post(self._schedule, actor, conn)
                    if conn
                    else self._schedule_later(actor)
                ),
            )
        elif kind == "error":
            self._set_dead(actor, f"The actor could not be scheduled: {reply[1]}")

    def _schedule_later(self, actor: _Actor) -> None:
        """Place the actor again after a pause (the node it was sent to is unreachable)."""
        attempt = actor.attempt

        def again() -> None:
            if (
                not actor.stale
                and attempt == actor.attempt
                and actor.conn is None
                and actor.kill_reason is None
            ):
                self._schedule(actor)

        timer = threading.Timer(RESCHEDULE_SECONDS, lambda: self.tenure.post(again))
        timer.daemon = True
        timer.start()

    def _on_worker(
        self, actor: _Actor, address: Any, conn: Connection | None, attempt: int, lease: tuple
    ) -> None:
        if actor.stale or attempt != actor.attempt or actor.kill_reason is not None:
            # A newer tenure or attempt took over, or it was killed while its worker was
            # being connected to.
            lease[0].send(("lease_return", lease[1], True))
            if not actor.stale and attempt == actor.attempt:
                actor.lease = None
                self._set_dead(actor, actor.kill_reason)
            return
        if conn is None:
            self._return_lease(actor, kill=True)
            self._schedule(actor)
            return
        self._watch(actor, conn)
        actor_bytes = bytes.fromhex(actor.actor_id)
        restarts = actor.info.get("num_restarts", 0)
        grant = actor.grant or {}
        placement = {  # what get_runtime_context() and CUDA_VISIBLE_DEVICES show in the actor
            "resources": actor.info.get("resources") or {},
            "gpu_ids": grant.get("gpu_ids") or [],
        }
        if grant.get("pg_id"):
            placement.update(pg_id=grant["pg_id"], capture=grant.get("capture", False))
        self.client.peers.call_async(
            conn,
            "actor_create",
            (actor_bytes, actor.spec, restarts, placement),
            lambda reply: self.tenure.post(self._on_created, actor, address, conn, reply),
        )

    def _on_created(self, actor: _Actor, address: Any, conn: Connection, reply: Any) -> None:
        if actor.stale:
            self._return_lease(actor, kill=True)  # a successor places it: this one must go
            return
        if actor.conn is not conn or reply is CONNECTION_LOST or actor.lease is None:
            return  # the connection's close handles it (lease None: killed meanwhile)
        if reply[0] == "error":
            actor.info["creation_error"] = reply[1]
            self._return_lease(actor, kill=True)
            self._set_dead(actor, "The actor's constructor raised an exception.")
            return
        _, pid = reply
        raylet, lease_id = actor.lease
        host, port, worker_id = address
        try:
            self._publish(
                actor,
                state="ALIVE",
                address=[host, port, worker_id.hex()],
                pid=pid,
                node_id=self._node_of(raylet),
            )
        except NotLeaderError:
            self._return_lease(actor, kill=True)  # not ours to run any more
            raise
        raylet.send(("lease_resize", lease_id, actor.info.get("resources") or {}))
        if actor.kill_reason is not None:
            self._kill(actor, actor.kill_reason)

    # -- watching ---------------------------------------------------------------------------
    def _reconnect(self, actor: _Actor) -> None:
        """Watch an actor placed by a previous tenure (restart it if it is gone)."""
        if actor.stale:
            return
        host, port, worker_hex = actor.info["address"]
        address = (host, port, bytes.fromhex(worker_hex))

        def connected(conn: Connection | None) -> None:
            if conn is None:
                self.tenure.post(self._on_lost_on_takeover, actor)
                return
            self.tenure.post(self._watch_existing, actor, conn)

        self.client.peers.peer_async(address, connected)

    def _watch(self, actor: _Actor, conn: Connection) -> None:
        """Follow the actor's process through our connection to it: its close is a death."""
        actor.conn = conn
        previous = conn.on_close

        def closed(c: Connection) -> None:
            if previous is not None:
                previous(c)
            self.tenure.post(self._on_actor_conn_closed, actor, c)

        conn.on_close = closed

    def _watch_existing(self, actor: _Actor, conn: Connection) -> None:
        if actor.stale:
            return
        self._watch(actor, conn)
        conn.send(("actor_control", bytes.fromhex(actor.actor_id)))

    def _on_lost_on_takeover(self, actor: _Actor) -> None:
        if actor.stale:
            return
        actor.conn = None
        self._actor_gone(actor)

    def _on_actor_conn_closed(self, actor: _Actor, conn: Connection) -> None:
        if actor.stale or actor.conn is not conn:
            return
        actor.conn = None
        self._actor_gone(actor)

    def _actor_gone(self, actor: _Actor) -> None:
        """The actor's process is gone: restart it or record its death."""
        actor.lease = None
        info = actor.info
        if actor.kill_reason is not None:
            self._set_dead(actor, actor.kill_reason)
        elif actor.exit_reason is not None:
            self._set_dead(actor, actor.exit_reason)
        elif info.get("state") == "DEAD":
            return
        else:
            max_restarts = info.get("max_restarts", 0)
            restarts = info.get("num_restarts", 0)
            if max_restarts == -1 or restarts < max_restarts:
                # Written first: a leader whose tenure ended is refused here, and does not
                # restart an actor its successor restarts.
                self._publish(actor, state="RESTARTING", num_restarts=restarts + 1, address=None)
                self._schedule(actor)
            else:
                self._set_dead(
                    actor,
                    "The actor died unexpectedly (its worker process exited or was killed)"
                    + (" and it has no restarts left." if max_restarts else "."),
                )

    # -- killing ----------------------------------------------------------------------------
    def _kill(self, actor: _Actor, reason: str | None) -> None:
        """Kill the actor's process; reason=None lets it restart (kill(no_restart=False))."""
        self.tenure.require()
        if reason is not None:
            actor.kill_reason = reason
        address = actor.info.get("address")
        if address and (actor.conn is not None or actor.info.get("state") == "ALIVE"):
            # Its process runs (watched by us, or adopted and being reconnected to): it goes;
            # the close of our connection to it (or the failed reconnect) records the death.
            epoch = self.tenure.require().epoch
            self._send_to_node(
                actor.info.get("node_id"), ("kill_worker", bytes.fromhex(address[2]), epoch)
            )
        elif actor.conn is not None and actor.lease is not None:
            # Its constructor is running: the worker goes with its lease (its connection's
            # close then records the death).
            self._return_lease(actor, kill=True)
        elif reason is not None and actor.info.get("state") != "ALIVE":
            self._set_dead(actor, reason)

    def _send_to_node(self, node_id: str | None, message: tuple) -> None:
        if not node_id or node_id == self.tenure.host.node_id:
            self.client.raylet.send(message)
        else:
            self.client.peers.send_to_raylet(node_id, message)

    def _return_lease(self, actor: _Actor, kill: bool) -> None:
        if actor.lease is not None:
            raylet, lease_id = actor.lease
            raylet.send(("lease_return", lease_id, kill))
            actor.lease = None

    def _set_dead(self, actor: _Actor, cause: str) -> None:
        if actor.info.get("state") == "DEAD":
            return
        fence = self.tenure.require()
        name = actor.info.get("name")
        if name:  # free first: whoever sees it dead may at once reuse the name
            self.gcs.release_name(
                gcs_schema.NAMED_ACTORS, actor.info.get("namespace", ""), name, actor.actor_id
            )
        self._publish(actor, state="DEAD", death_cause=cause, address=None, fence=fence)
        self.actors.pop(actor.actor_id, None)
        self.terminating.pop(actor.actor_id, None)

    def _publish(self, actor: _Actor, fence: Any = None, **changes: Any) -> None:
        """Write the actor's new state (fenced) and announce it."""
        fence = fence or self.tenure.require()
        info = {**actor.info, **changes}
        info["seq"] = info.get("seq", 0) + 1
        self.gcs.update_actor(actor.actor_id, info, fence=fence)
        actor.info = info

    def _node_of(self, raylet: Connection) -> str:
        if raylet is self.client.raylet:
            return self.tenure.host.node_id
        return self.client.peers.raylet_of(raylet) or ""
