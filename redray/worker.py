"""The core worker: what every driver and worker process runs.

It owns the objects its process creates (the values of small ones, the whereabouts of large
ones), counts references to them across processes, fetches objects it borrows from their
owners, and talks to its raylet. Task submission lives in `submitter.py`, task execution in
`executor.py`; both hang off this object.

Threads: user threads call in (get/put/submit); the reactor thread handles every incoming
message. Shared state is guarded by `self._lock`; nothing blocking happens while it is held.
Besides the reactor's I/O thread the core worker runs a background thread (blocking GCS
calls), a watcher thread (pub/sub, started on first need), short-lived connect and lookup
threads, and a small pool that turns objects awaited as futures into values off the loop
(reading a stored object waits for the raylet). `shutdown` ends them all and wakes every
thread still waiting with ReactorStoppedError.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redray import exceptions
from redray import gcs as gcs_schema
from redray.core import context, serialization
from redray.core.ids import IdSource
from redray.core.object_ref import Address, ObjectRef
from redray.core.ownership import Ownership, Payload
from redray.core.reference_table import ObjectEntry, ReferenceTable
from redray.core.waiting import ListWatch, Waiting
from redray.gcs import Gcs
from redray.transport.connection import Connection
from redray.transport.offloop import OffLoop
from redray.transport.reactor import Reactor, ReactorStoppedError
from redray.watcher import Watcher, is_connection_error

log = logging.getLogger(__name__)

CONNECTION_LOST = ConnectionError("connection lost")
SHUTDOWN_REASON = "redray.shutdown() was called while this call was waiting"
SETTLE_THREADS = 4  # threads reading stored objects for futures (each waits on the raylet)


@dataclass(frozen=True)
class JobInfo:
    """What every process running a job's tasks needs to know about the job."""

    job_id: str
    driver: Address  # where prints of the job's tasks go
    namespace: str
    log_to_driver: bool = True
    paths: tuple[str, ...] = ()  # the driver's script directory and cwd, importable by tasks
    runtime_env: dict | None = None


class CoreWorker(Ownership, Waiting):
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
        self.token = token
        self.worker_id = worker_id
        self.job_id = job_id
        self._namespace = namespace
        self.log_to_driver = log_to_driver
        self.jobs: dict[str, JobInfo] = {}
        self.ids = IdSource(worker_id[:8])
        self.reactor = Reactor(token, name=f"redray-io-{mode}")
        host, port = self.reactor.listen(listen_host, 0, self._on_message, self._on_conn_closed)
        self.address: Address = (host, port, worker_id)
        self.gcs = Gcs(gcs_url, cluster)
        self.refs = ReferenceTable(worker_id, self.address)
        self._lock = self.refs.lock  # guards the table's entries (values, callbacks) too
        self._objects: dict[bytes, ObjectEntry] = self.refs.objects
        self._locations: dict[bytes, set[str]] = {}  # copies of our objects on other nodes
        self._ready = threading.Condition()  # signalled when any object becomes ready here
        self._ready_version = 0
        self._ready_waiters = 0
        self._watches: dict[int, ListWatch] = {}  # per thread: the list `wait` returned to it
        self._watch_timer = False
        self._watching_deaths = False
        self._released: collections.deque[bytes] = collections.deque()
        self._release_pending = False
        self._calls: dict[int, Callable[[Any], None]] = {}
        self._call_ids = itertools.count(1)
        self._peers: dict[bytes, Connection] = {}
        self._peer_lock = threading.Lock()
        self._connecting: dict[bytes, list[Callable]] = {}
        self._functions: dict[str, Any] = {}
        self._exported: dict[str, bytes] = {}  # functions we exported, served to our workers
        self._arena = None
        self.shutting_down = False
        self.raylet_lost = False  # the local raylet is gone: no API call can succeed
        self._off_loop = OffLoop(SETTLE_THREADS, "redray-settle")
        self.executor = None  # set in worker processes
        self.blocked_depth = 0

        self._handlers: dict[str, Callable[[Connection, tuple], None]] = {
            "reply": self._on_reply,
            "hello": self._on_hello,
            "job": self._on_job,
            "get_obj": self._on_get_object,
            "borrow": self._on_borrow,
            "unborrow": self._on_unborrow,
            "add_location": self._on_add_location,
            "reconstruct": self._on_reconstruct,
            "get_function": self._on_get_function,
            "log": self._on_log,
            "warn": self._on_warning,
        }
        from redray.core.actor_submitter import ActorSubmitter
        from redray.core.task_submitter import TaskSubmitter

        self.submitter = TaskSubmitter(self)
        self.actors = ActorSubmitter(self)
        from redray.util.placement_group import PlacementGroups

        self.placement_groups = PlacementGroups(self)
        self.watcher = Watcher(
            self.gcs,
            {
                gcs_schema.ACTOR_STATE_CHANNEL.format(actor_id="*"): self.actors.on_state,
                gcs_schema.PG_STATE_CHANNEL.format(pg_id="*"): self.placement_groups.on_state,
                gcs_schema.WORKER_CHANNEL: self._on_process_death,
            },
            lambda: self.shutting_down,
        )
        self._background: queue.SimpleQueue = queue.SimpleQueue()
        self._background_thread = threading.Thread(
            target=self._run_background, daemon=True, name="redray-bg"
        )
        self._background_thread.start()
        try:
            self.raylet = self.reactor.connect(
                raylet_address, self._on_message, self._on_raylet_lost
            )
            node = self.call(
                self.raylet,
                "register",
                mode,
                worker_id,
                os.getpid(),
                self.address,
                job_id,
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

    # -- plumbing ---------------------------------------------------------------------------
    def handle(self, kind: str, handler: Callable[[Connection, tuple], None]) -> None:
        """Route incoming messages of `kind` to handler (on the reactor thread)."""
        self._handlers[kind] = handler

    def _on_message(self, conn: Connection, message: tuple) -> None:
        handler = self._handlers.get(message[0])
        if handler is None:
            log.warning("unknown message %r from %r", message[0], conn)
            return
        handler(conn, message)

    def call_async(self, conn: Connection, kind: str, args: tuple, callback: Callable) -> None:
        """Send a request; callback(reply) runs on the reactor thread (CONNECTION_LOST on loss).

        Never calls back before returning (the caller may hold locks, or loop until its
        request is answered), except once the reactor is stopped: nothing else would."""
        call_id = next(self._call_ids)
        self._calls[call_id] = callback
        conn.info.setdefault("calls", set()).add(call_id)
        if not conn.send((kind, call_id, *args)):
            conn.info["calls"].discard(call_id)
            self._calls.pop(call_id, None)
            if self.reactor.stopped:
                callback(CONNECTION_LOST)
            else:
                self.reactor.call_soon(callback, CONNECTION_LOST)

    def call(self, conn: Connection, kind: str, *args: Any, timeout: float | None = None) -> Any:
        """Send a request and wait for its reply; CONNECTION_LOST if the peer went away.

        Not on the thread running the reactor loop (LoopBlockedError: see Reactor.block);
        ReactorStoppedError once redray is shut down."""
        waiter = self.reactor.waiter()
        result: list[Any] = []

        def on_reply(reply: Any) -> None:
            result.append(reply)
            waiter.set()

        self.call_async(conn, kind, args, on_reply)
        if not self.reactor.block(waiter, timeout, spin=True):
            raise exceptions.GetTimeoutError(f"no reply to {kind} within {timeout} s")
        reply = result[0]
        if reply is CONNECTION_LOST and self.shutting_down:
            raise ReactorStoppedError(SHUTDOWN_REASON)
        return reply

    def _on_reply(self, conn: Connection, message: tuple) -> None:
        _, call_id, reply = message
        conn.info.get("calls", set()).discard(call_id)
        callback = self._calls.pop(call_id, None)
        if callback is not None:
            callback(reply)

    def _on_conn_closed(self, conn: Connection) -> None:
        for call_id in conn.info.get("calls", ()):
            callback = self._calls.pop(call_id, None)
            if callback is not None:
                try:
                    callback(CONNECTION_LOST)
                except Exception:
                    log.exception("callback failed on connection loss")
        peer = conn.info.get("peer_id")
        if peer is not None:
            with self._peer_lock:
                if self._peers.get(peer) is conn:
                    del self._peers[peer]
        self.submitter.on_connection_lost(conn)
        self.actors.on_connection_lost(conn)
        if self.executor is not None:
            self.executor.on_connection_lost(conn)

    def _on_raylet_lost(self, conn: Connection) -> None:
        """The local raylet died: a worker exits; a driver fails everything pending with
        LocalRayletDiedError, as it does every API call from now on (see context.worker)."""
        if self.shutting_down:
            self._on_conn_closed(conn)
            return
        if self.mode == "worker":
            os._exit(1)
        self.raylet_lost = True
        log.error(
            "The raylet of this node died: this driver can no longer run tasks or reach "
            "objects; every redray call now raises LocalRayletDiedError."
        )
        self._on_conn_closed(conn)
        self.fail_pending(exceptions.LocalRayletDiedError("the raylet of this node died"))

    def _on_hello(self, conn: Connection, message: tuple) -> None:
        address = message[1]
        conn.info.update(peer=address, peer_id=address[2])
        with self._peer_lock:
            self._peers.setdefault(address[2], conn)

    def route_to(self, conn: Connection) -> Connection:
        """The connection everything we send to conn's peer travels on (the first one made
        between us): a reply sent there is never overtaken by what we send the peer after
        it, such as the release of a ref the reply carries."""
        route = self._peers.get(conn.info.get("peer_id"))
        return route if route is not None and not route.closed else conn

    def peer(self, address: Address) -> Connection:
        """A connection to another core worker (made once, then reused)."""
        with self._peer_lock:
            conn = self._peers.get(address[2])
        if conn is not None and not conn.closed:
            return conn
        conn = self.reactor.connect(address[:2], self._on_message, self._on_conn_closed)
        conn.info.update(peer=address, peer_id=address[2])
        conn.send(("hello", self.address))
        with self._peer_lock:
            current = self._peers.get(address[2])
            if current is not None and not current.closed:
                # Both sides connected at once. Keep ours open (the peer may already use
                # it) but route everything through the first one, so order is kept.
                return current
            self._peers[address[2]] = conn
        return conn

    def peer_async(self, address: Address, then: Callable[[Connection | None], None]) -> None:
        """Like `peer`, without blocking the calling thread on a new connection.

        Callbacks for one peer run in the order they were requested, so messages sent from
        them keep their order even while the connection is still being made.
        """
        peer_id = address[2]
        with self._peer_lock:
            waiting = self._connecting.get(peer_id)
            if waiting is not None:
                waiting.append(then)
                return
            conn = self._peers.get(peer_id)
            if conn is None or conn.closed:
                self._connecting[peer_id] = [then]
        if conn is not None and not conn.closed:
            then(conn)
            return

        def connect() -> None:
            try:
                result = self.peer(address)
            except OSError:
                result = None
            while True:
                with self._peer_lock:
                    callbacks = self._connecting[peer_id]
                    if not callbacks:
                        del self._connecting[peer_id]
                        return
                    self._connecting[peer_id] = []
                for callback in callbacks:
                    try:
                        callback(result)
                    except Exception:
                        log.exception("peer callback failed")

        threading.Thread(target=connect, daemon=True, name="redray-connect").start()

    # -- jobs -------------------------------------------------------------------------------
    def current_job(self) -> JobInfo:
        """The job the calling code belongs to (the running task's, or the driver's)."""
        executor = self.executor
        if executor is not None:
            ctx = executor.context()
            if ctx is not None:
                job = self.jobs.get(ctx.job_id)
                if job is not None:
                    return job
        job = self.jobs.get(self.job_id)
        if job is None:
            job = JobInfo(self.job_id, self.address, self._namespace, self.log_to_driver)
        return job

    @property
    def namespace(self) -> str:
        return self.current_job().namespace

    def introduce(self, conn: Connection, job: JobInfo) -> None:
        """Tell a peer about a job before the first task of that job is sent to it."""
        known = conn.info.get("jobs")
        if known is None:
            known = conn.info["jobs"] = set()
        if job.job_id not in known:
            known.add(job.job_id)
            conn.send(("job", job))

    def _on_job(self, conn: Connection, message: tuple) -> None:
        job = message[1]
        self.jobs[job.job_id] = job

    # -- readiness --------------------------------------------------------------------------
    def on_ready(self, ref: ObjectRef, callback: Callable[[], None]) -> None:
        """Run callback (on some runtime thread) once the object's payload is known here."""
        oid = ref._id
        with self._lock:
            obj = self._objects.get(oid)
            if obj is None:
                obj = self._objects[oid] = ObjectEntry(
                    ref._owner if ref._owner != self.address else None
                )
            if obj.value is None:
                if obj.callbacks is None:
                    obj.callbacks = []
                obj.callbacks.append(callback)
                fetch = obj.owner is not None and not obj.fetching
                if fetch:
                    obj.fetching = True
            else:
                fetch = None
        if fetch is None:
            callback()
        elif fetch:
            self._fetch_from_owner(oid, obj.owner)

    def _fetch_from_owner(self, oid: bytes, owner: Address) -> None:
        def on_reply(reply: Any) -> None:
            if reply is CONNECTION_LOST or isinstance(reply, BaseException):
                reply = ("e", pickle_error(exceptions.OwnerDiedError(oid.hex(), owner)))
            elif reply[0] == "lost":
                reply = ("e", pickle_error(exceptions.ObjectLostError(oid.hex(), owner)))
            self.set_value(oid, reply)

        def ask(conn: Connection | None) -> None:
            if conn is None:
                on_reply(CONNECTION_LOST)
            else:
                self.call_async(conn, "get_obj", (oid,), on_reply)

        self.peer_async(owner, ask)

    def first_ready(self, ids: list[bytes], num: int) -> list[int]:
        """Positions of the first `num` objects (in order) whose payload is known here."""
        objects = self._objects
        found = []
        for index, oid in enumerate(ids):
            obj = objects.get(oid)
            if obj is not None and obj.value is not None:
                found.append(index)
                if len(found) == num:
                    break
        return found

    def wait_ready(self, refs: list[ObjectRef], num: int, timeout: float | None) -> None:
        """Block until `num` of refs are ready here or timeout passes (no error).

        Rather than a callback per ref (costly for long lists), waiters sleep on one
        condition that `set_value` signals, and rescan from the start: with results arriving
        roughly in order, the scan stops after a few refs.
        """
        ids = [r._id for r in refs]
        if len(self.first_ready(ids, num)) >= num:
            return
        self._start_fetches(refs)
        deadline = None if timeout is None else time.monotonic() + timeout
        ready = self._ready
        with ready:
            self._ready_waiters += 1

        def wait() -> None:
            self.reactor.ensure_running()  # this thread sleeps on a condition, not in the loop
            while True:
                with ready:
                    seen = self._ready_version
                if len(self.first_ready(ids, num)) >= num:
                    return
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return
                with ready:
                    if self._ready_version == seen:
                        ready.wait(remaining)

        try:
            self._block(wait)
        finally:
            with ready:
                self._ready_waiters -= 1

    def _start_fetches(self, refs: list[ObjectRef]) -> None:
        """Ask owners for the borrowed objects among refs (all at once, not one by one)."""
        objects = self._objects
        for ref in refs:
            obj = objects.get(ref._id)
            if obj is None or (obj.owner is not None and obj.value is None and not obj.fetching):
                self.on_ready(ref, _nothing)

    def _wait_for(self, ref: ObjectRef, timeout: float | None) -> bool:
        """Block until one object is ready here; False on timeout."""
        waiter = self.reactor.waiter()
        self.on_ready(ref, waiter.set)
        return self.reactor.block(waiter, timeout, spin=True)

    def _block(self, wait: Callable[[], Any]) -> Any:
        """Wait, lending this worker's CPU back to the raylet meanwhile."""
        lend = self.executor is not None and self.executor.running_task()
        if lend:
            self.blocked_depth += 1
            if self.blocked_depth == 1:
                self.raylet.send(("blocked",))
        try:
            return wait()
        finally:
            if lend:
                self.blocked_depth -= 1
                if self.blocked_depth == 0:
                    self.raylet.send(("unblocked",))

    # -- get / put / wait -------------------------------------------------------------------
    def get_objects(self, refs: list[ObjectRef], timeout: float | None) -> list[Any]:
        self.process_released()
        objects = self._objects
        pending = []
        for ref in refs:
            obj = objects.get(ref._id)
            if obj is None or obj.value is None:
                pending.append(ref)
        if pending:
            self._start_fetches(pending)  # borrowed ones: ask every owner at once
            deadline = None if timeout is None else time.monotonic() + timeout

            def wait_all() -> bool:
                # Results on one connection arrive in order: wait for the last pending one
                # (one callback, one wake-up), then for whatever is still missing.
                left = pending
                while left:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if self.payload_of(left[-1]._id) is None and not self._wait_for(
                        left[-1], remaining
                    ):
                        return False
                    left = [r for r in left if self.payload_of(r._id) is None]
                return True

            if not self._block(wait_all):
                raise exceptions.GetTimeoutError(
                    f"Get timed out: some object(s) not ready after {timeout} s."
                )
        return [self.materialize(ref._id, self.payload_of(ref._id)) for ref in refs]

    def materialize(self, oid: bytes, payload: Payload, _attempt: int = 0) -> Any:
        """Turn a payload into the user's value (raising the task's error, if it failed)."""
        kind = payload[0]
        if kind == "v":
            data = payload[1]
            if not payload[2]:
                return serialization.loads(data)
            with context.deserializing(len(payload[2])) as scope:
                value = serialization.loads(data)
            if scope.refs:
                self.register_borrows(scope.refs)
            return value
        if kind == "e":
            raise unpickle_error(payload[1])
        if kind == "s":
            return self.read_from_store(oid, payload, _attempt)
        raise exceptions.RaySystemError(f"unknown payload kind {kind!r}")

    def put_object(self, value: Any, owner: Address | None = None) -> ObjectRef:
        if isinstance(value, ObjectRef):
            raise TypeError(
                "Calling 'put' on an ray.ObjectRef is not allowed. If you really want to do "
                "this, you can wrap the ray.ObjectRef in a list and call 'put' on it."
            )
        self.process_released()
        oid = self.ids.put_id()
        payload, nested = self.serialize_value(value, oid, "the object")
        self.new_owned(oid)
        ref = ObjectRef(oid, self.address)
        self.own_nested(oid, nested)
        self.set_value(oid, payload)
        return ref

    def own_nested(self, oid: bytes, nested: list[ObjectRef]) -> None:
        """An owned value contains refs: keep them alive as long as it is."""
        if not nested:
            return
        ids = [r._id for r in nested]
        self.pin(ids)
        with self._lock:
            obj = self._objects.get(oid)
            if obj is not None:
                obj.nested = ids

    def serialize_value(
        self, value: Any, oid: bytes, what: str, owner_id: bytes | None = None
    ) -> tuple[Payload, list[ObjectRef]]:
        """A payload for value: inline when small, else written to this node's store."""
        try:
            inband, buffers, refs = serialization.dumps_oob(value)
        except Exception as exc:
            raise serialization.describe_failure(value, exc, what) from exc
        nested = [(r._id, r._owner) for r in refs]
        size = serialization.oob_size(inband, buffers)
        if size <= serialization.INLINE_LIMIT:
            if buffers:
                inband, refs2 = serialization.dumps(value)
            return ("v", inband, nested), refs
        size = self.write_to_store(oid, inband, buffers, owner_id or self.worker_id)
        return ("s", self.node_id, size, nested), refs

    # -- the shared-memory store ------------------------------------------------------------
    def arena(self):
        if self._arena is None:
            from redray.objstore.arena import SharedArena

            self._arena = SharedArena.from_descriptor(tuple(self.node["store"]))
        return self._arena

    def write_to_store(self, oid: bytes, inband: bytes, buffers: list, owner_id: bytes) -> int:
        from redray.objstore import files, layout

        serialized = layout.Serialized(inband, buffers)
        size = serialized.total_size
        reply = self.call(self.raylet, "alloc", oid, size, owner_id)
        if reply is CONNECTION_LOST:
            raise exceptions.LocalRayletDiedError("the raylet is gone")
        if isinstance(reply, BaseException):
            raise reply
        # An arena offset, or the path of a file when the arena had no room for the object.
        serialized.write_to(files.region(self.arena(), reply, size, writable=True))
        self.raylet.send(("seal", oid))
        return size

    def read_from_store(self, oid: bytes, payload: Payload, _attempt: int = 0) -> Any:
        """Map a store object's region and deserialize it zero-copy; unpinned once unused."""
        from redray.objstore import files, layout

        obj = self._objects.get(oid)
        owner = obj.owner if obj is not None else None
        owner_id = owner[2] if owner is not None else self.worker_id
        reply = self.call(self.raylet, "pin", oid, payload[1], owner_id)
        if reply is CONNECTION_LOST:
            raise exceptions.LocalRayletDiedError("the raylet of this node is gone")
        if isinstance(reply, exceptions.ObjectLostError) and _attempt < 3:
            return self.materialize(oid, self.recover(oid, owner), _attempt + 1)
        if isinstance(reply, BaseException):
            raise reply
        location, size, copied = reply
        if copied:
            if owner is None:
                self.add_location(oid, self.node_id)
            else:
                self.send_to_owner(owner, ("add_location", oid, self.node_id))
        view = files.region(self.arena(), location, size, writable=False)
        raylet = self.raylet

        def release() -> None:
            raylet.send(("unpin", oid))

        with context.deserializing(len(payload[3])) as scope:
            value = layout.deserialize(view, on_release=release)
        if scope.refs:
            self.register_borrows(scope.refs)
        return value

    # -- lost objects -----------------------------------------------------------------------
    def recover(self, oid: bytes, owner: Address | None) -> Payload:
        """The payload of a lost object once its owner made it again (lineage), or an error."""
        if owner is None:
            if not self.submitter.reconstruct(oid):
                return ("e", pickle_error(exceptions.ObjectLostError(oid.hex(), self.address)))
            return self.wait_payload(oid)
        try:
            conn = self.peer(owner)
        except OSError:
            return ("e", pickle_error(exceptions.OwnerDiedError(oid.hex(), owner)))
        reply = self.call(conn, "reconstruct", oid)
        if reply is CONNECTION_LOST or isinstance(reply, BaseException):
            return ("e", pickle_error(exceptions.OwnerDiedError(oid.hex(), owner)))
        with self._lock:
            obj = self._objects.get(oid)
            if obj is not None:
                obj.value = reply
        return reply

    def _on_reconstruct(self, conn: Connection, message: tuple) -> None:
        _, call_id, oid = message

        def answer() -> None:
            conn.send(("reply", call_id, self.payload_of(oid)))

        def start() -> None:
            if not self.submitter.reconstruct(oid):
                error = exceptions.ObjectLostError(oid.hex(), self.address)
                conn.send(("reply", call_id, ("e", pickle_error(error))))
                return
            self.on_payload(oid, answer)

        self.background(start)

    def forget_values(self, oids: list[bytes]) -> None:
        """Mark owned objects as pending again (they are being made anew)."""
        with self._lock:
            for oid in oids:
                obj = self._objects.get(oid)
                if obj is not None and obj.owner is None:
                    obj.value = None
            if self._watches:
                self.note_pending_in_watches(oids)

    def on_payload(self, oid: bytes, callback: Callable[[], None]) -> None:
        """callback() once the object's payload is known here (at once if it is)."""
        with self._lock:
            obj = self._objects.get(oid)
            if obj is not None and obj.value is None:
                if obj.callbacks is None:
                    obj.callbacks = []
                obj.callbacks.append(callback)
                return
        callback()

    def wait_payload(self, oid: bytes) -> Payload:
        waiter = self.reactor.waiter()
        self.on_payload(oid, waiter.set)
        self._block(lambda: self.reactor.block(waiter))
        payload = self.payload_of(oid)
        if payload is None:
            return ("e", pickle_error(exceptions.ObjectLostError(oid.hex(), self.address)))
        return payload

    def prefetch(self, refs: list[ObjectRef]) -> None:
        """Start moving ready objects to this node (they are already here on one node)."""

    def free_in_store(self, node_id: str, oids: list[bytes]) -> None:
        if node_id == self.node_id:
            self.raylet.send(("free", oids))
        else:
            self.submitter.send_to_raylet(node_id, ("free", oids))

    # -- functions --------------------------------------------------------------------------
    def export_function(self, key: str, blob_factory: Callable[[], bytes]) -> None:
        """Record a function or class in the GCS (once); we also serve it to our workers."""
        if key not in self._exported:
            blob = blob_factory()
            self.gcs.export_function(key, blob)
            self._exported[key] = blob

    def load_function(self, key: str, owner: Connection | None = None) -> Any:
        """A function by key: cached, else from the owner that submitted it (no Redis on the
        task path), else from the GCS function table."""
        fn = self._functions.get(key)
        if fn is None:
            blob = None
            if owner is not None:
                reply = self.call(owner, "get_function", key)
                blob = reply if isinstance(reply, bytes) else None
            if blob is None:
                blob = self.gcs.function(key)
            if blob is None:
                raise exceptions.RaySystemError(f"function {key} was never exported")
            fn = self._functions[key] = serialization.loads_function(blob)
        return fn

    def _on_get_function(self, conn: Connection, message: tuple) -> None:
        _, call_id, key = message
        conn.send(("reply", call_id, self._exported.get(key)))

    # -- logs -------------------------------------------------------------------------------
    def _on_log(self, conn: Connection, message: tuple) -> None:
        _, entries = message
        if self.mode != "driver":
            return
        for stream, prefix, text in entries:
            out = sys.stderr if stream == 2 else sys.stdout
            try:
                out.write("".join(f"{prefix} {line}\n" for line in text.splitlines()))
                out.flush()
            except (ValueError, OSError):
                pass

    def _on_warning(self, conn: Connection, message: tuple) -> None:
        print(message[1], file=sys.stderr, flush=True)

    # -- life cycle -------------------------------------------------------------------------
    def background(self, fn: Callable, *args: Any) -> None:
        """Run fn(*args) on this process's background thread (for blocking GCS calls)."""
        self._background.put((fn, args))

    def _run_background(self) -> None:
        redis_down = False
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
                if is_connection_error(exc):
                    if not redis_down:
                        log.warning("a GCS request failed: Redis is unreachable (%s)", exc)
                    redis_down = True
                else:
                    log.exception("background call %r failed", fn)
            else:
                redis_down = False

    def drain_background(self, timeout: float = 5.0) -> None:
        """Wait (up to timeout) until what was handed to the background thread has run:
        requests a program made just before it exits (a placement group's removal) still
        reach the cluster."""
        if threading.current_thread() is self._background_thread:
            return
        done = threading.Event()
        self._background.put((done.set, ()))
        done.wait(timeout)

    def settle_future(self, future: concurrent.futures.Future, ref: ObjectRef) -> None:
        """Resolve future with the (ready) object's value or error, without blocking the
        calling thread, which may run the reactor loop: an inline value is turned into the
        user's value here, a stored one (its reading waits for the raylet) on a pool thread."""
        payload = self.payload_of(ref._id)
        if payload is not None and payload[0] != "s":
            _resolve(future, self.materialize, ref._id, payload)
            return
        if not self._off_loop.submit(_resolve, future, self._get_one, ref):
            _resolve(future, _raise, ReactorStoppedError(SHUTDOWN_REASON))

    def _get_one(self, ref: ObjectRef) -> Any:
        return self.get_objects([ref], timeout=None)[0]

    def fail_pending(self, error: BaseException) -> None:
        """Give every object not made yet `error` as its value: whoever waits for one (get,
        wait, a future) gets the error instead of waiting for what can no longer come."""
        with self._lock:
            pending = [oid for oid, obj in self._objects.items() if obj.value is None]
        if not pending:
            return
        payload = ("e", pickle_error(error))
        for oid in pending:
            with self._lock:
                obj = self._objects.get(oid)
                if obj is None or obj.value is not None:
                    continue
            self.set_value(oid, payload)

    def shutdown(self) -> None:
        """Leave the cluster: return leases, stop every thread of the core worker, close its
        sockets, Redis connections and shared memory; threads still waiting for something
        get ReactorStoppedError (a RaySystemError)."""
        self.drain_background()
        self.shutting_down = True
        try:
            self.submitter.shutdown()
        except Exception:
            log.exception("submitter shutdown failed")
        self.reactor.stop(SHUTDOWN_REASON)
        self.fail_pending(ReactorStoppedError(SHUTDOWN_REASON))
        self._stop_threads()
        if self._arena is not None:
            self._arena.close()

    def _stop_threads(self) -> None:
        """End the threads this core worker started and close its connections."""
        self.shutting_down = True
        self.watcher.stop()
        self.reactor.stop(SHUTDOWN_REASON)
        self._off_loop.stop()
        self._background.put(None)
        if threading.current_thread() is not self._background_thread:
            self._background_thread.join(timeout=5)
        self.gcs.close()  # (also ends the watcher's wait for a message)
        self.watcher.join(timeout=5)


def _raise(error: BaseException) -> None:
    raise error


def _resolve(future: concurrent.futures.Future, fn: Callable, *args: Any) -> None:
    """future gets fn(*args), or what it raised (a task's error goes to whoever awaits it)."""
    if future.done():  # cancelled by its awaiter
        return
    try:
        value = fn(*args)
    except BaseException as exc:
        try:
            future.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass
    else:
        try:
            future.set_result(value)
        except concurrent.futures.InvalidStateError:
            pass


def _nothing() -> None:
    pass


def pickle_error(exc: BaseException) -> bytes:
    import cloudpickle

    try:
        return cloudpickle.dumps(exc)
    except Exception:
        return cloudpickle.dumps(exceptions.RaySystemError(repr(exc)))


def unpickle_error(data: bytes) -> BaseException:
    try:
        err = serialization.loads(data)
    except Exception as exc:
        return exceptions.RaySystemError(f"could not deserialize the task's error: {exc}")
    if isinstance(err, exceptions.RayTaskError):
        return err.as_instanceof_cause()
    return err
