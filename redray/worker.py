"""The core worker: what every driver and worker process runs, assembled from the core's parts.

- `peers` (transport): message routing, requests and replies, connections to other processes;
- `refs` + `ownership`: reference counts and the borrow/release protocol they imply;
- `objects` (object I/O): values, get/put/wait, the node's shared-memory store;
- `jobs` (job context): the jobs, functions and driver output of the code running here;
- `submitter`, `actors`, `placement_groups`: tasks, actor calls and groups submitted from here;
- `executor` (worker processes only): runs pushed tasks and actor calls.

Threads: user threads call in (get/put/submit); the reactor thread handles every incoming
message. Besides the reactor's I/O thread the core worker runs a background thread (blocking
GCS calls), a watcher thread (pub/sub, started on first need), short-lived connect threads,
and a small pool that turns objects awaited as futures into values off the loop. `shutdown`
ends them all and wakes every thread still waiting with ReactorStoppedError.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from redray import exceptions
from redray import gcs as gcs_schema
from redray.core.actor_submitter import ActorSubmitter
from redray.core.ids import OWNER_BYTES, IdSource
from redray.core.jobs import Jobs
from redray.core.object_io import ObjectIO
from redray.core.ownership import Ownership
from redray.core.peers import CONNECTION_LOST, SHUTDOWN_REASON, Address, Peers
from redray.core.placement_groups import PlacementGroups
from redray.core.reference_table import ReferenceTable
from redray.core.serialization import unpickle_error
from redray.core.task_submitter import TaskSubmitter
from redray.gcs import Gcs
from redray.outage import OUTAGE_ENV, health, outage_limit
from redray.state import events as task_events
from redray.state import objects as state_objects
from redray.transport.connection import Connection
from redray.transport.reactor import Reactor, ReactorStoppedError
from redray.watcher import Watcher, is_connection_error

log = logging.getLogger(__name__)


class CoreWorker:
    """The runtime inside one driver or worker process."""

    def __init__(
        self,
        *,
        mode: str,
        token: bytes,
        raylet_address: tuple[str, int],
        gcs_url: str,
        cluster: str,
        worker_id: bytes,
        job_id: str,
        namespace: str,
        listen_host: str = "127.0.0.1",
        log_to_driver: bool = True,
    ):
        self.mode = mode
        self.worker_id = worker_id
        self.ids = IdSource(worker_id[:OWNER_BYTES])
        self.reactor = Reactor(token, name=f"redray-io-{mode}")
        # Drivers' and workers' calls that need Redis wait out an outage (the control
        # loop's own client rides outages out itself).
        ride_out = outage_limit() if mode != "control" else 0.0
        self.gcs = Gcs(gcs_url, cluster, ride_out=ride_out)
        if ride_out:
            health.consequence = (
                "Tasks and calls to live actors carry on; calls that need Redis (creating "
                f"actors, looking up named actors...) wait up to {ride_out:g} s for it "
                f"({OUTAGE_ENV})."
            )
        self.executor: Any = None  # set in worker processes
        self.raylet_lost = False  # the local raylet is gone: no API call can succeed
        self._background: queue.SimpleQueue = queue.SimpleQueue()
        self._background_thread = threading.Thread(
            target=self._run_background, daemon=True, name="redray-bg"
        )
        host, port = self.reactor.listen(listen_host, 0, self._on_message, self._on_closed)
        self.address: Address = (host, port, worker_id)
        self.peers = Peers(self.reactor, self.address, self.gcs)
        self.refs = ReferenceTable(worker_id, self.address)
        self.ownership = Ownership(self.refs, self.peers, self.reactor, worker_id)
        self.objects = ObjectIO(
            self.refs,
            self.ownership,
            self.peers,
            self.reactor,
            self.ids,
            worker_id,
            self.background,
        )
        self.jobs = Jobs(
            self.peers,
            self.gcs,
            job_id=job_id,
            namespace=namespace,
            log_to_driver=log_to_driver,
            prints_here=mode == "driver",
        )
        self.submitter = TaskSubmitter(
            self.peers, self.ownership, self.objects, self.jobs, self.ids, self.background
        )
        self.actors = ActorSubmitter(
            self.submitter,
            self.peers,
            self.ownership,
            self.objects,
            self.jobs,
            self.gcs,
            self.background,
        )
        self.placement_groups = PlacementGroups(
            self.gcs, self.objects, self.jobs, worker_id, self.background
        )
        self.watcher = Watcher(
            self.gcs,
            {
                gcs_schema.ACTOR_STATE_CHANNEL.format(actor_id="*"): self.actors.on_state,
                gcs_schema.PG_STATE_CHANNEL.format(pg_id="*"): self.placement_groups.on_state,
                gcs_schema.WORKER_CHANNEL: self.ownership.on_process_death,
            },
            lambda: self.peers.shutting_down,
            resync=self._resync,
        )
        self.actors.follow_states = self.watcher.ensure_running
        self.placement_groups.follow_states = self.watcher.ensure_running
        self.ownership.watch_deaths = lambda: self.background(self.watcher.ensure_running)
        # The calls every ObjectRef and unpickled value makes, without a lookup each.
        self.add_local_ref = self.ownership.add_local_ref
        self.remove_local_ref = self.ownership.remove_local_ref
        self.count_deserialized = self.ownership.count_deserialized
        self.register_borrows = self.ownership.register_borrows
        self._background_thread.start()
        try:
            self.raylet = self.peers.connect(raylet_address, self._on_raylet_lost)
            node = self.peers.call(
                self.raylet, "register", mode, worker_id, os.getpid(), self.address, job_id
            )
            if node is CONNECTION_LOST:
                raise exceptions.RaySystemError("the raylet closed the connection at registration")
            if isinstance(node, BaseException):
                raise exceptions.RaySystemError(f"could not register with the raylet: {node}")
        except BaseException:
            self._stop_threads()
            raise
        self.node: dict[str, Any] = node
        self.node_id: str = node["node_id"]
        self.objects.attach(self.raylet, node)
        self.submitter.attach(self.raylet)
        self.peers.handle("state_objects", self._on_state_objects)
        if task_events.enabled():
            recorder = task_events.TaskEventRecorder(
                self.reactor.call_later, self._ship_task_events, _describe_error
            )
            recorder.still_pending = self.submitter.still_pending
            recorder.issued = self.ids.issued
            self.submitter.events = recorder

    def _on_state_objects(self, conn: Connection, message: tuple) -> None:
        """The raylet gathers the objects of its processes for the state API (bounded)."""
        conn.send(
            ("reply", message[1], state_objects.process_objects(self.refs, self.mode, message[2]))
        )

    def _ship_task_events(self, events: list, ended: list, dropped: int) -> None:
        """(reactor thread) This process's task events go to its raylet, which writes them."""
        self.raylet.send(("task_events", events, dropped, ended))

    def flush_task_events(self) -> None:
        """Ship the task events recorded so far now (before leaving, or for a reader that
        wants its own tasks' latest states)."""
        recorder = self.submitter.events
        if recorder is not None and not self.raylet.closed:
            events, ended, dropped = recorder.take()
            if events or ended or dropped:
                self._ship_task_events(events, ended, dropped)

    # -- what the API asks of the process ---------------------------------------------------
    @property
    def job_id(self) -> str:
        return self.jobs.job_id

    @job_id.setter
    def job_id(self, job_id: str) -> None:
        self.jobs.job_id = job_id

    @property
    def namespace(self) -> str:
        return self.jobs.namespace

    @property
    def shutting_down(self) -> bool:
        return self.peers.shutting_down

    # -- messages ---------------------------------------------------------------------------
    def _on_message(self, conn: Connection, message: tuple) -> None:
        self.peers.on_message(conn, message)

    def _on_closed(self, conn: Connection) -> None:
        self.peers.on_conn_closed(conn)

    def _on_raylet_lost(self, conn: Connection) -> None:
        """The local raylet died: a worker exits; a driver fails everything pending with
        LocalRayletDiedError, as it does every API call from now on (see context.worker)."""
        if self.shutting_down:
            self.peers.on_conn_closed(conn)
            return
        if self.mode == "worker":
            os._exit(1)
        self.raylet_lost = True
        self.gcs.ride_out = 0.0  # nothing of this driver's waits for Redis any more
        log.error(
            "The raylet of this node died: this driver can no longer run tasks or reach "
            "objects; every redray call now raises LocalRayletDiedError."
        )
        self.peers.on_conn_closed(conn)
        self.objects.fail_pending(exceptions.LocalRayletDiedError("the raylet of this node died"))

    def _resync(self) -> None:
        """The state subscription was made again (watcher thread): what was published while
        it was down is lost, so the mirrors re-read the tables (on the background thread)."""
        self.actors.resync()
        self.placement_groups.resync()

    # -- the background thread --------------------------------------------------------------
    def background(self, fn: Callable, *args: Any) -> None:
        """Run fn(*args) on this process's background thread (for blocking GCS calls)."""
        self._background.put((fn, args))

    def _run_background(self) -> None:
        while True:
            item = self._background.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception as exc:
                if self.shutting_down:
                    continue
                if is_connection_error(exc):  # (the outage itself is logged once, by health)
                    health.lost(exc)
                    log.debug("background call %r failed: %s", fn, exc)
                else:
                    log.exception("background call %r failed", fn)

    def drain_background(self, timeout: float = 5.0) -> None:
        """Wait (up to timeout) until what was handed to the background thread has run:
        requests a program made just before it exits (a placement group's removal) still
        reach the cluster."""
        if threading.current_thread() is self._background_thread:
            return
        done = threading.Event()
        self._background.put((done.set, ()))
        done.wait(timeout)

    # -- life cycle -------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Leave the cluster: return leases, stop every thread of the core worker, close its
        sockets, Redis connections and shared memory; threads still waiting for something
        get ReactorStoppedError (a RaySystemError)."""
        self.gcs.ride_out = 0.0  # leaving: what still needs Redis does not wait for it
        self.drain_background()
        try:
            self.flush_task_events()
        except Exception:
            log.debug("shipping the last task events failed", exc_info=True)
        self.peers.shutting_down = True
        try:
            self.submitter.shutdown()
        except Exception:
            log.exception("submitter shutdown failed")
        self.reactor.stop(SHUTDOWN_REASON)
        self.objects.fail_pending(ReactorStoppedError(SHUTDOWN_REASON))
        self._stop_threads()

    def _stop_threads(self) -> None:
        """End the threads this core worker started and close its connections."""
        self.peers.shutting_down = True
        self.watcher.stop()
        self.reactor.stop(SHUTDOWN_REASON)
        self.objects.close()
        self._background.put(None)
        if (
            self._background_thread.is_alive()
            and threading.current_thread() is not self._background_thread
        ):
            self._background_thread.join(timeout=5)
        self.gcs.close()  # (also ends the watcher's wait for a message)
        self.watcher.join(timeout=5)


def _describe_error(payload: Any) -> tuple[str, str]:
    """(Ray's error type, message) of a failed task's error payload."""
    error = unpickle_error(payload[1])
    return task_events.error_type_of(error), str(error)
