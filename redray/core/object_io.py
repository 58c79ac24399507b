"""Object I/O of a core worker: values and their readiness, `get`, `put`, `wait`, and the
node's shared-memory store.

An object's payload (see `Payload`) is known here once its task replied, it was put, or its
owner answered our request for it. Small values travel inline; large ones are written once to
this node's store and read zero-copy (the raylet pins them while mapped, and pulls them from
their node first when needed). A stored object lost with its node is made again from its
lineage by its owner (`reconstruct`, set by the task submitter).

Threads: user threads call get/put/wait; the reactor thread sets values as replies arrive.
Entries are guarded by the reference table's lock; nothing blocking happens under it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from redray import exceptions
from redray.core import context, serialization
from redray.core.ids import IdSource
from redray.core.object_ref import ObjectRef
from redray.core.ownership import Ownership
from redray.core.peers import CONNECTION_LOST, SHUTDOWN_REASON, Address, Peers
from redray.core.reference_table import ObjectEntry, ReferenceTable, Released
from redray.core.serialization import error_payload, unpickle_error
from redray.core.waiting import Waiting
from redray.objstore import files
from redray.objstore.arena import SharedArena
from redray.transport.connection import Connection
from redray.transport.offloop import OffLoop
from redray.transport.reactor import Reactor, ReactorStoppedError

log = logging.getLogger(__name__)

# An object's payload, as stored by its owner and sent to whoever asks for it:
#   ("v", pickled bytes, nested)          the value inline
#   ("s", node_id, size, nested)          the value is in node_id's shared-memory store
#   ("e", pickled exception)              the task that should make it failed
#   ("actor", keep)                       an actor handle's entry (see actor_submitter.py)
# nested: [(object_id, owner address)] of the refs the value contains.
Payload = tuple

SETTLE_THREADS = 4  # threads reading stored objects for futures (each waits on the raylet)


def _nothing() -> None:
    pass


def _run(wait: Callable[[], Any]) -> Any:
    return wait()


class ObjectIO:
    """Values of the objects a process owns or borrows, and how they get to its user."""

    def __init__(
        self,
        refs: ReferenceTable,
        ownership: Ownership,
        peers: Peers,
        reactor: Reactor,
        ids: IdSource,
        worker_id: bytes,
        background: Callable[..., None],
    ):
        self.refs = refs
        self._lock = refs.lock
        self._objects = refs.objects
        self._ownership = ownership
        self._peers = peers
        self._reactor = reactor
        self._ids = ids
        self._worker_id = worker_id
        self._background = background
        self._locations: dict[bytes, set[str]] = {}  # copies of our objects on other nodes
        self._ready = threading.Condition()  # signalled when any object becomes ready here
        self._ready_version = 0
        self._ready_waiters = 0
        self._arena: SharedArena | None = None
        self._off_loop = OffLoop(SETTLE_THREADS, "redray-settle")
        self.raylet: Connection | None = None  # this node's raylet (see `attach`)
        self.node_id = ""
        self._store_descriptor: tuple | None = None
        # Set by the core worker: how a blocked caller waits (a task lends its CPU back
        # meanwhile), and how a lost object we own is made again (False: it cannot be).
        self.blocking: Callable[[Callable[[], Any]], Any] = _run
        self.reconstruct: Callable[[bytes], bool] = lambda oid: False
        self.waiting = Waiting(refs, ownership, reactor, self.start_fetches, self._wait)
        ownership.before_release = self.waiting.check_watches
        ownership.on_owned_freed(self._free_stored)
        peers.handle("get_obj", self._on_get_object)
        peers.handle("add_location", self._on_add_location)

    def attach(self, raylet: Connection, node: dict[str, Any]) -> None:
        """This node's raylet and what it said about the node (at registration)."""
        self.raylet = raylet
        self.node_id = node["node_id"]
        self._store_descriptor = tuple(node["store"])

    def _wait(self, wait: Callable[[], Any]) -> Any:
        return self.blocking(wait)

    # -- values -----------------------------------------------------------------------------
    def set_value(
        self, object_id: bytes, payload: Payload, nested: list[bytes] | None = None
    ) -> bool:
        """Record an object's payload and wake whoever waits; False if nobody refers to it.
        `nested`: the (pinned) refs the value contains, released when the object is: set in
        the same step, so whoever gets the value and drops it at once releases them too."""
        waiting = self.waiting
        with self._lock:
            obj = self._objects.get(object_id)
            if obj is None:
                callbacks = None
            else:
                obj.value = payload
                if nested:
                    obj.nested = nested
                obj.fetching = False
                callbacks, obj.callbacks = obj.callbacks, None
                if waiting.watching:
                    waiting.note_ready(object_id)
        if obj is None:
            if payload[0] == "s":
                self.free_in_store(payload[1], [object_id])
            return False
        if callbacks:
            for callback in callbacks:
                try:
                    callback()
                except Exception:
                    log.exception("object-ready callback failed")
        if self._ready_waiters:
            with self._ready:
                self._ready_version += 1
                self._ready.notify_all()
        return True

    def payload_of(self, object_id: bytes) -> Payload | None:
        obj = self._objects.get(object_id)
        return None if obj is None else obj.value

    def is_owned(self, object_id: bytes) -> bool:
        obj = self._objects.get(object_id)
        return obj is not None and obj.owner is None

    def forget_values(self, oids: list[bytes]) -> None:
        """Mark owned objects as pending again (they are being made anew)."""
        with self._lock:
            for oid in oids:
                obj = self._objects.get(oid)
                if obj is not None and obj.owner is None:
                    obj.value = None
            if self.waiting.watching:
                self.waiting.note_pending(oids)

    def fail_pending(self, error: BaseException) -> None:
        """Give every object not made yet `error` as its value: whoever waits for one (get,
        wait, a future) gets the error instead of waiting for what can no longer come."""
        with self._lock:
            pending = [oid for oid, obj in self._objects.items() if obj.value is None]
        if not pending:
            return
        payload = error_payload(error)
        for oid in pending:
            with self._lock:
                obj = self._objects.get(oid)
                if obj is None or obj.value is not None:
                    continue
            self.set_value(oid, payload)

    def _on_get_object(self, conn: Connection, message: tuple) -> None:
        """A borrower asks for an object we own; answer when it is ready."""
        _, call_id, oid = message
        with self._lock:
            obj = self._objects.get(oid)
            if obj is not None and obj.owner is None and obj.value is None:
                if obj.callbacks is None:
                    obj.callbacks = []
                obj.callbacks.append(lambda: conn.send(("reply", call_id, obj.value)))
                return
        if obj is None or obj.owner is not None:
            conn.send(("reply", call_id, ("lost",)))
        else:
            conn.send(("reply", call_id, obj.value))

    # -- readiness --------------------------------------------------------------------------
    def on_ready(self, ref: ObjectRef, callback: Callable[[], None]) -> None:
        """Run callback (on some runtime thread) once the object's payload is known here."""
        oid = ref._id
        with self._lock:
            obj = self._objects.get(oid)
            if obj is None:
                owner = ref._owner if ref._owner != self._peers.address else None
                obj = self._objects[oid] = ObjectEntry(owner)
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

    def _fetch_from_owner(self, oid: bytes, owner: Address) -> None:
        def on_reply(reply: Any) -> None:
            if reply is CONNECTION_LOST or isinstance(reply, BaseException):
                reply = error_payload(exceptions.OwnerDiedError(oid.hex(), owner))
            elif reply[0] == "lost":
                reply = error_payload(exceptions.ObjectLostError(oid.hex(), owner))
            self.set_value(oid, reply)

        def ask(conn: Connection | None) -> None:
            if conn is None:
                on_reply(CONNECTION_LOST)
            else:
                self._peers.call_async(conn, "get_obj", (oid,), on_reply)

        self._peers.peer_async(owner, ask)

    def start_fetches(self, refs: list[ObjectRef]) -> None:
        """Ask owners for the borrowed objects among refs (all at once, not one by one)."""
        objects = self._objects
        for ref in refs:
            obj = objects.get(ref._id)
            if obj is None or (obj.owner is not None and obj.value is None and not obj.fetching):
                self.on_ready(ref, _nothing)

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
        self.start_fetches(refs)
        deadline = None if timeout is None else time.monotonic() + timeout
        ready = self._ready
        with ready:
            self._ready_waiters += 1

        def wait() -> None:
            self._reactor.ensure_running()  # this thread sleeps on a condition, not in the loop
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
            self.blocking(wait)
        finally:
            with ready:
                self._ready_waiters -= 1

    def _wait_for(self, ref: ObjectRef, timeout: float | None) -> bool:
        """Block until one object is ready here; False on timeout."""
        waiter = self._reactor.waiter()
        self.on_ready(ref, waiter.set)
        return self._reactor.block(waiter, timeout, spin=True)

    def wait_payload(self, oid: bytes) -> Payload:
        """Block until an object we own has its payload again (it is being made anew)."""
        waiter = self._reactor.waiter()
        self.on_payload(oid, waiter.set)
        self.blocking(lambda: self._reactor.block(waiter))
        payload = self.payload_of(oid)
        if payload is None:
            return error_payload(exceptions.ObjectLostError(oid.hex(), self._peers.address))
        return payload

    # -- get / put --------------------------------------------------------------------------
    def get(self, refs: list[ObjectRef], timeout: float | None) -> list[Any]:
        """The values of refs, in order (raising the error of the first that failed)."""
        self._ownership.process_released()
        objects = self._objects
        pending = []
        for ref in refs:
            obj = objects.get(ref._id)
            if obj is None or obj.value is None:
                pending.append(ref)
        if pending:
            self.start_fetches(pending)  # borrowed ones: ask every owner at once
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

            if not self.blocking(wait_all):
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
                self._ownership.register_borrows(scope.refs)
            return value
        if kind == "e":
            raise unpickle_error(payload[1])
        if kind == "s":
            return self.read_from_store(oid, payload, _attempt)
        raise exceptions.RaySystemError(f"unknown payload kind {kind!r}")

    def put(self, value: Any) -> ObjectRef:
        """Store a value this process owns; a ref to it."""
        if isinstance(value, ObjectRef):
            raise TypeError(
                "Calling 'put' on an ray.ObjectRef is not allowed. If you really want to do "
                "this, you can wrap the ray.ObjectRef in a list and call 'put' on it."
            )
        self._ownership.process_released()
        oid = self._ids.put_id()
        payload, nested = self.serialize_value(value, oid, "the object")
        self._ownership.new_owned(oid)
        ref = ObjectRef(oid, self._peers.address)
        self.own_nested(oid, nested)
        self.set_value(oid, payload)
        return ref

    def new_ref(self) -> ObjectRef:
        """A ref to a new object this process owns, whose value comes later (`set_value`)."""
        oid = self._ids.put_id()
        self._ownership.new_owned(oid)
        return ObjectRef(oid, self._peers.address)

    def own_nested(self, oid: bytes, nested: list[ObjectRef]) -> None:
        """An owned value contains refs: keep them alive as long as it is."""
        if not nested:
            return
        ids = [r._id for r in nested]
        self._ownership.pin(ids)
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
                inband, _ = serialization.dumps(value)
            return ("v", inband, nested), refs
        size = self.write_to_store(oid, inband, buffers, owner_id or self._worker_id)
        return ("s", self.node_id, size, nested), refs

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
        return self.get([ref], timeout=None)[0]

    # -- the shared-memory store ------------------------------------------------------------
    def arena(self) -> SharedArena:
        if self._arena is None:
            self._arena = SharedArena.from_descriptor(self._store_descriptor)
        return self._arena

    def write_to_store(self, oid: bytes, inband: bytes, buffers: list, owner_id: bytes) -> int:
        from redray.objstore import layout  # (numpy: only processes that use the store pay)

        serialized = layout.Serialized(inband, buffers)
        size = serialized.total_size
        reply = self._peers.call(self.raylet, "alloc", oid, size, owner_id)
        if reply is CONNECTION_LOST:
            raise exceptions.LocalRayletDiedError("the raylet is gone")
        if isinstance(reply, BaseException):
            raise reply
        if reply == files.ALREADY_STORED:
            return size
        # An arena offset, or the path of a file when the arena had no room for the object.
        serialized.write_to(files.region(self.arena(), reply, size, writable=True))
        self.raylet.send(("seal", oid))
        return size

    def read_from_store(self, oid: bytes, payload: Payload, _attempt: int = 0) -> Any:
        """Map a store object's region and deserialize it zero-copy; unpinned once unused."""
        from redray.objstore import layout  # (numpy: only processes that use the store pay)

        obj = self._objects.get(oid)
        owner = obj.owner if obj is not None else None
        owner_id = owner[2] if owner is not None else self._worker_id
        reply = self._peers.call(self.raylet, "pin", oid, payload[1], owner_id)
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
                self._peers.send_to(owner, ("add_location", oid, self.node_id))
        view = files.region(self.arena(), location, size, writable=False)
        raylet = self.raylet

        def release() -> None:
            raylet.send(("unpin", oid))

        with context.deserializing(len(payload[3])) as scope:
            value = layout.deserialize(view, on_release=release)
        if scope.refs:
            self._ownership.register_borrows(scope.refs)
        return value

    def add_location(self, oid: bytes, node_id: str) -> None:
        """Another node holds a copy of an object we own: free it there too, later."""
        with self._lock:
            if oid in self._objects:
                self._locations.setdefault(oid, set()).add(node_id)

    def _on_add_location(self, conn: Connection, message: tuple) -> None:
        self.add_location(message[1], message[2])

    def _free_stored(self, owned: Released) -> None:
        """Our objects nobody counts any more: free them in every store holding a copy."""
        by_node: dict[str, list[bytes]] = {}
        for oid, obj in owned:
            value = obj.value
            if value is not None and value[0] == "s":
                by_node.setdefault(value[1], []).append(oid)
        if not by_node:
            return
        with self._lock:
            for oids in list(by_node.values()):
                for oid in oids:
                    for node_id in self._locations.pop(oid, ()):
                        by_node.setdefault(node_id, []).append(oid)
        for node_id, oids in by_node.items():
            self.free_in_store(node_id, oids)

    def free_in_store(self, node_id: str, oids: list[bytes]) -> None:
        if node_id == self.node_id:
            self.raylet.send(("free", oids))
        else:  # (finding another node's raylet may read the GCS: not on this thread)
            self._background(self._peers.send_to_raylet, node_id, ("free", oids))

    def prefetch(self, refs: list[ObjectRef]) -> None:
        """Start moving ready objects to this node (they are already here on one node)."""

    # -- lost objects -----------------------------------------------------------------------
    def recover(self, oid: bytes, owner: Address | None) -> Payload:
        """The payload of a lost object once its owner made it again (lineage), or an error."""
        if owner is None:
            if not self.reconstruct(oid):
                return error_payload(exceptions.ObjectLostError(oid.hex(), self._peers.address))
            return self.wait_payload(oid)
        try:
            conn = self._peers.peer(owner)
        except OSError:
            return error_payload(exceptions.OwnerDiedError(oid.hex(), owner))
        reply = self._peers.call(conn, "reconstruct", oid)
        if reply is CONNECTION_LOST or isinstance(reply, BaseException):
            return error_payload(exceptions.OwnerDiedError(oid.hex(), owner))
        with self._lock:
            obj = self._objects.get(oid)
            if obj is not None:
                obj.value = reply
        return reply

    def close(self) -> None:
        self._off_loop.stop()
        if self._arena is not None:
            self._arena.close()


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
