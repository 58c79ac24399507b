"""The GCS control loop: cluster decisions that must outlive any one driver.

It runs on every head node but acts only while it holds the leadership lease in Redis
(renewed every half second), so a standby head takes over when the active one dies. The
leader detects dead nodes from expired heartbeats and manages actors: it places them
(leasing a worker like any owner would), watches their processes, restarts them up to
`max_restarts`, kills them on request or when their owner dies or drops its last handle, and
publishes every state change to the actor's channel.

All decisions run on one thread, fed by a queue of events, so the state needs no locks;
Redis calls happen on that thread too, never on a reactor thread.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from redray import gcs as gcs_schema
from redray.control.placement import HostNode, PlacementGroupManager
from redray.core.peers import CONNECTION_LOST
from redray.gcs import Gcs
from redray.transport.connection import Connection
from redray.watcher import Watcher
from redray.worker import CoreWorker

log = logging.getLogger(__name__)

LEADER_TTL = float(os.environ.get("REDRAY_LEADER_TTL", "3"))
TICK_SECONDS = 0.5
# An actor ended gracefully (its last reference is gone) is killed if it has not finished the
# calls it accepted within this time (Ray: actor_graceful_shutdown_timeout_ms).
GRACEFUL_EXIT_SECONDS = float(os.environ.get("REDRAY_ACTOR_GRACEFUL_SHUTDOWN_TIMEOUT_S", "30"))
OUT_OF_SCOPE = "The actor is dead because all references to the actor were removed."


@dataclass
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
    extra: dict[str, Any] = field(default_factory=dict)


class ControlLoop:
    """Leader-elected cluster manager living in a head raylet's process."""

    def __init__(self, raylet: HostNode):
        self.raylet = raylet
        self.holder = raylet.node_id
        self.gcs = Gcs(raylet.config["gcs_url"], raylet.config["cluster"])
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.leader = False
        self.client: CoreWorker | None = None
        self.actors: dict[str, _Actor] = {}
        # Actors asked to finish their calls and exit: id -> (deadline, its connection then).
        self.terminating: dict[str, tuple[float, Any]] = {}
        self.stopping = threading.Event()
        self.pgs = PlacementGroupManager(self.gcs, raylet, self.post, self.kill_actors_in_group)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True, name="redray-control").start()

    def stop(self) -> None:
        self.stopping.set()
        self.events.put(None)

    def post(self, fn: Any, *args: Any) -> None:
        """Run fn(*args) on the control thread."""
        self.events.put((fn, args))

    # -- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        next_tick = 0.0
        while not self.stopping.is_set():
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_SECONDS
                try:
                    self._tick()
                except Exception:
                    log.exception("control loop tick failed")
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                self._flush()  # nothing else to do now: write what this burst decided
                try:
                    event = self.events.get(timeout=max(0.0, next_tick - time.monotonic()))
                except queue.Empty:
                    continue
            if event is None:
                break
            fn, args = event
            try:
                fn(*args)
            except Exception:
                log.exception("control loop event %r failed", fn)
        self._flush()
        if self.leader:
            try:
                self.gcs.release_leadership(self.holder)
            except Exception:
                pass

    def _flush(self) -> None:
        try:
            self.pgs.flush()
        except Exception:
            log.exception("writing placement-group state failed")

    def _tick(self) -> None:
        if self.gcs.hold_leadership(self.holder, LEADER_TTL):
            if not self.leader:
                self._become_leader()
            self._check_nodes()
            self._kill_overdue_exits()
            self.pgs.retry_pending()
        elif self.leader:
            log.warning("lost the control loop's leadership")
            self.leader = False

    def _become_leader(self) -> None:
        log.info("this head now runs the control loop")
        self.leader = True
        if self.client is None:
            self.client = CoreWorker(
                mode="control",
                token=self.raylet.token,
                raylet_address=self.raylet.address,
                gcs_url=self.raylet.config["gcs_url"],
                cluster=self.raylet.config["cluster"],
                worker_id=os.urandom(16),
                job_id="",
                namespace="",
                listen_host=self.raylet.host,
            )
            self.client.peers.handle("actor_exiting", self._on_actor_exiting)
            self.pgs.client = self.client
            threading.Thread(target=self._take_requests, daemon=True, name="requests").start()
            Watcher(
                self.gcs,
                {
                    gcs_schema.WORKER_CHANNEL: lambda e: self.post(
                        self._on_process_died, e["worker_id"]
                    )
                },
                self.stopping.is_set,
            ).ensure_running()
        self._adopt_actors()
        self.pgs.adopt()

    # -- inputs -----------------------------------------------------------------------------
    def _take_requests(self) -> None:
        gcs = Gcs(self.raylet.config["gcs_url"], self.raylet.config["cluster"])
        while not self.stopping.is_set():
            if not self.leader:
                time.sleep(TICK_SECONDS)
                continue
            try:
                requests = gcs.pop_requests(timeout=1)
            except Exception:
                if self.stopping.is_set():
                    return
                log.exception("reading control requests failed")
                time.sleep(TICK_SECONDS)
                continue
            if requests:
                self.post(self._handle_requests, requests)

    def _handle_requests(self, requests: list[bytes]) -> None:
        """Act on a burst of requests, in order (one event for the burst, not one each)."""
        for raw in requests:
            request = pickle.loads(raw)
            handler = getattr(self, f"_request_{request[0]}", None)
            if handler is None:
                log.warning("unknown control request %r", request[0])
                continue
            try:
                handler(*request[1:])
            except Exception:
                log.exception("control request %r failed", request[0])

    # -- nodes ------------------------------------------------------------------------------
    def _check_nodes(self) -> None:
        for node in self.gcs.nodes():
            if node.get("state") == "ALIVE" and not node["alive"]:
                if self.gcs.mark_node_dead(node["node_id"], "missed heartbeats"):
                    log.warning("node %s is dead (no heartbeat)", node["node_id"])

    # -- actors: requests -------------------------------------------------------------------
    def _request_create_actor(self, actor_id: str) -> None:
        if actor_id in self.actors:
            return  # already being placed (adopted from the table when we took over)
        info = self.gcs.actor(actor_id)
        spec = self.gcs.actor_spec(actor_id)
        if info is None or spec is None or info.get("state") == "DEAD":
            return
        actor = self.actors[actor_id] = _Actor(actor_id, info, spec)
        self._schedule(actor)

    def _request_kill_actor(self, actor_id: str, no_restart: bool) -> None:
        actor = self.actors.get(actor_id)
        if actor is None:
            return
        self._kill(actor, "The actor was killed by ray.kill()." if no_restart else None)

    def _request_actor_out_of_scope(self, actor_id: str) -> None:
        """Its owner holds no reference to it any more (nor does anyone it lent one to)."""
        actor = self.actors.get(actor_id)
        if actor is None or actor.info.get("detached"):
            return
        if actor.info.get("state") == "ALIVE" and actor.conn is not None:
            self._terminate(actor, OUT_OF_SCOPE)
        else:
            self._kill(actor, OUT_OF_SCOPE)

    def _terminate(self, actor: _Actor, reason: str) -> None:
        """End the actor gracefully, as Ray does for one out of scope: it refuses new calls,
        finishes those it accepted (from any caller), then exits; killed if that takes
        longer than GRACEFUL_EXIT_SECONDS."""
        actor.kill_reason = reason  # its death, however it comes: no restart, this cause
        self.terminating[actor.actor_id] = (time.monotonic() + GRACEFUL_EXIT_SECONDS, actor.conn)
        actor.conn.send(("actor_terminate", reason))

    def _kill_overdue_exits(self) -> None:
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

    def _request_create_pg(self, pg_id: str, info: dict) -> None:
        self.pgs.create(pg_id, info)

    def _request_remove_pg(self, pg_id: str) -> None:
        self.pgs.remove(pg_id)

    def kill_actors_in_group(self, pg_id: str) -> None:
        for actor in list(self.actors.values()):
            strategy = actor.info.get("strategy")
            if isinstance(strategy, dict) and strategy.get("pg_id") == pg_id:
                self._kill(actor, "The actor's placement group was removed.")

    def _on_process_died(self, worker_id_hex: str) -> None:
        """A driver or worker died: what it owned (unless detached) dies with it."""
        self.pgs.owner_died(worker_id_hex)
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

    def _on_actor_exiting(self, conn: Connection, message: tuple) -> None:
        _, actor_id, reason = message
        self.post(self._note_exit, actor_id.hex(), reason)

    def _note_exit(self, actor_id: str, reason: str) -> None:
        actor = self.actors.get(actor_id)
        if actor is not None:
            actor.exit_reason = f"The actor exited on purpose: {reason}."

    # -- actors: life cycle -----------------------------------------------------------------
    def _schedule(self, actor: _Actor, raylet: Connection | None = None) -> None:
        """Ask a raylet for a worker that fits the actor (following spillback)."""
        info = actor.info
        request = {
            "resources": info.get("placement_resources") or {},
            "env_vars": info.get("env_vars") or {},
            "strategy": info.get("strategy"),
            "name": info.get("class_name", "actor"),
            "actor": True,
            "spilled": raylet is not None,
        }
        raylet = raylet or self.client.raylet
        actor.attempt += 1
        attempt = actor.attempt
        self.client.peers.call_async(
            raylet,
            "lease",
            (request,),
            lambda reply: self.post(self._on_lease, actor, raylet, attempt, reply),
        )

    def _on_lease(self, actor: _Actor, raylet: Connection, attempt: int, reply: Any) -> None:
        if reply is CONNECTION_LOST:
            self._schedule_later(actor)  # that raylet died: try again from ours
            return
        kind = reply[0]
        if actor.kill_reason is not None or attempt != actor.attempt:
            if kind == "granted":
                raylet.send(("lease_return", reply[1], True))
            if actor.kill_reason is not None:
                self._set_dead(actor, actor.kill_reason)
            return
        if kind == "granted":
            _, lease_id, address, grant = reply
            actor.lease = (raylet, lease_id)
            actor.grant = grant
            self.client.peers.peer_async(
                tuple(address),
                lambda conn: self.post(
                    self._on_worker, actor, address, conn, attempt, (raylet, lease_id)
                ),
            )
        elif kind == "spillback":
            _, node_id, raylet_address = reply
            self.client.peers.connect_raylet(
                node_id,
                raylet_address,
                lambda conn: (
                    self.post(self._schedule, actor, conn) if conn else self._schedule_later(actor)
                ),
            )
        elif kind == "error":
            self._set_dead(actor, f"The actor could not be scheduled: {reply[1]}")

    def _schedule_later(self, actor: _Actor, delay: float = 0.5) -> None:
        """Place the actor again after a pause (the node it was sent to is unreachable)."""
        attempt = actor.attempt

        def again() -> None:
            if attempt == actor.attempt and actor.conn is None and actor.kill_reason is None:
                self._schedule(actor)

        timer = threading.Timer(delay, lambda: self.post(again))
        timer.daemon = True
        timer.start()

    def _on_worker(
        self, actor: _Actor, address: Any, conn: Connection | None, attempt: int, lease: tuple
    ) -> None:
        if attempt != actor.attempt or actor.kill_reason is not None:
            # A newer attempt took over, or it was killed while its worker was connected to.
            lease[0].send(("lease_return", lease[1], True))
            if attempt == actor.attempt:
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
            lambda reply: self.post(self._on_created, actor, address, conn, reply),
        )

    def _on_created(self, actor: _Actor, address: Any, conn: Connection, reply: Any) -> None:
        if actor.conn is not conn or reply is CONNECTION_LOST or actor.lease is None:
            return  # the connection's close handles it (lease None: killed meanwhile)
        if reply[0] == "error":
            actor.info["creation_error"] = reply[1]
            self._return_lease(actor, kill=True)
            self._set_dead(actor, "The actor's constructor raised an exception.")
            return
        _, pid = reply
        raylet, lease_id = actor.lease
        raylet.send(("lease_resize", lease_id, actor.info.get("resources") or {}))
        node_id = self._node_of(raylet)
        host, port, worker_id = address
        self._publish(
            actor,
            state="ALIVE",
            address=[host, port, worker_id.hex()],
            pid=pid,
            node_id=node_id,
        )
        if actor.kill_reason is not None:
            self._kill(actor, actor.kill_reason)

    def _on_actor_conn_closed(self, actor: _Actor, conn: Connection) -> None:
        if actor.conn is not conn:
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
                self._publish(actor, state="RESTARTING", num_restarts=restarts + 1, address=None)
                self._schedule(actor)
            else:
                self._set_dead(
                    actor,
                    "The actor died unexpectedly (its worker process exited or was killed)"
                    + (" and it has no restarts left." if max_restarts else "."),
                )

    def _kill(self, actor: _Actor, reason: str | None) -> None:
        """Kill the actor's process; reason=None lets it restart (kill(no_restart=False))."""
        if reason is not None:
            actor.kill_reason = reason
        address = actor.info.get("address")
        if actor.conn is not None and address:
            self._send_to_node(
                actor.info.get("node_id"), ("kill_worker", bytes.fromhex(address[2]))
            )
        elif actor.conn is not None and actor.lease is not None:
            # Its constructor is running: the worker goes with its lease (its connection's
            # close then records the death).
            self._return_lease(actor, kill=True)
        elif reason is not None and actor.info.get("state") != "ALIVE":
            self._set_dead(actor, reason)

    def _send_to_node(self, node_id: str | None, message: tuple) -> None:
        if not node_id or node_id == self.raylet.node_id:
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
        name = actor.info.get("name")
        if name:  # free first: whoever sees it dead may at once reuse the name
            self.gcs.release_name(
                gcs_schema.NAMED_ACTORS, actor.info.get("namespace", ""), name, actor.actor_id
            )
        self._publish(actor, state="DEAD", death_cause=cause, address=None)
        self.actors.pop(actor.actor_id, None)
        self.terminating.pop(actor.actor_id, None)

    def _publish(self, actor: _Actor, **changes: Any) -> None:
        actor.info.update(changes)
        actor.info["seq"] = actor.info.get("seq", 0) + 1
        self.gcs.update_actor(actor.actor_id, actor.info)

    def _node_of(self, raylet: Connection) -> str:
        if raylet is self.client.raylet:
            return self.raylet.node_id
        return self.client.peers.raylet_of(raylet) or ""

    def _adopt_actors(self) -> None:
        """On taking over: carry on with every actor that is not dead."""
        for actor_id, info in self.gcs.table_all(gcs_schema.ACTORS).items():
            if info.get("state") == "DEAD" or actor_id in self.actors:
                continue
            spec = self.gcs.actor_spec(actor_id)
            if spec is None:
                continue
            actor = self.actors[actor_id] = _Actor(actor_id, info, spec)
            if info.get("state") == "ALIVE" and info.get("address"):
                self.post(self._reconnect, actor)
            else:
                self.post(self._schedule, actor)

    def _reconnect(self, actor: _Actor) -> None:
        """Watch an actor placed by a previous leader (restart it if it is gone)."""
        host, port, worker_hex = actor.info["address"]
        address = (host, port, bytes.fromhex(worker_hex))

        def connected(conn: Connection | None) -> None:
            if conn is None:
                self.post(self._on_lost_on_takeover, actor)
                return
            self.post(self._watch_existing, actor, conn)

        self.client.peers.peer_async(address, connected)

    def _watch(self, actor: _Actor, conn: Connection) -> None:
        """Follow the actor's process through our connection to it: its close is a death."""
        actor.conn = conn
        previous = conn.on_close

        def closed(c: Connection) -> None:
            if previous is not None:
                previous(c)
            self.post(self._on_actor_conn_closed, actor, c)

        conn.on_close = closed

    def _watch_existing(self, actor: _Actor, conn: Connection) -> None:
        self._watch(actor, conn)
        conn.send(("actor_control", bytes.fromhex(actor.actor_id)))

    def _on_lost_on_takeover(self, actor: _Actor) -> None:
        fake = object()
        actor.conn = fake  # type: ignore[assignment]
        self._on_actor_conn_closed(actor, fake)  # type: ignore[arg-type]
