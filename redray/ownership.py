"""Ownership: the objects a process owns or borrows, and counting references to them.

A process owns the objects it creates (puts and the returns of tasks it submits); others
borrow them. Each process counts, per object, its live ObjectRefs plus pins (pending tasks,
containing objects); an owner also counts, per borrower, the borrows registered with it.
An object is freed (in the owner's memory, in every node's store) once nobody counts it.
Counts are plain integers, so a borrow and its release may arrive in either order.

`Ownership` is a part of `CoreWorker` (worker.py), kept here to be read on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from redray.connection import Connection
from redray.object_ref import Address

log = logging.getLogger("redray.worker")

# An object's payload, as stored by its owner and sent to whoever asks for it:
#   ("v", pickled bytes, nested)          the value inline
#   ("s", node_id, size, nested)          the value is in node_id's shared-memory store
#   ("e", pickled exception)              the task that should make it failed
# nested: [(object_id, owner address)] of the refs the value contains.
Payload = tuple


RELEASE_SECONDS = 0.02


class ObjectEntry:
    """What this process knows of one object it owns or borrows."""

    __slots__ = (
        "owner",
        "count",
        "value",
        "callbacks",
        "borrowers",
        "registered",
        "via_task",
        "nested",
        "fetching",
    )

    def __init__(self, owner: Address | None):
        self.owner = owner  # None when this process owns the object
        self.count = 0  # live ObjectRefs here + pins (pending tasks, containing objects)
        self.value: Payload | None = None
        self.callbacks: list[Callable[[], None]] | None = None
        self.borrowers: dict[bytes, int] | None = None  # owner side: worker id -> count
        self.registered = 0  # borrower side: registrations the owner holds for us
        self.via_task = False  # borrower side: arrived as an argument of the running task
        self.nested: list[bytes] | None = None  # refs this value contains (pinned by it)
        self.fetching = False


class Ownership:
    """Reference counting and the owned-object table (mixed into CoreWorker)."""

    # -- reference counting -----------------------------------------------------------------
    def add_local_ref(self, object_id: bytes, owner: Address | None) -> None:
        with self._lock:
            obj = self._objects.get(object_id)
            if obj is None:
                obj = self._objects[object_id] = ObjectEntry(
                    None if owner == self.address else owner
                )
            obj.count += 1

    def count_deserialized(self, refs: list) -> list[bytes]:
        """Count refs just unpickled here (one lock for all); ids newly borrowed from others.

        `refs` are ObjectRefs or actor handles (`_id`, `_owner`). An object seen here for the
        first time and owned elsewhere is a new borrow: the caller registers those
        (`register_borrows`) once the whole value is rebuilt.
        """
        address = self.address
        new_borrows = []
        with self._lock:
            objects = self._objects
            for ref in refs:
                oid = ref._id
                obj = objects.get(oid)
                if obj is None:
                    owner = ref._owner
                    if owner == address:
                        owner = None
                    obj = objects[oid] = ObjectEntry(owner)
                    if owner is not None:
                        new_borrows.append(oid)
                obj.count += 1
        return new_borrows

    def register_borrows(self, object_ids: Iterable[bytes], via_task: bool = False) -> None:
        """Tell owners we hold refs to their objects (or, for task arguments, defer to the reply)."""
        by_owner: dict[tuple, list[bytes]] = {}
        with self._lock:
            for oid in object_ids:
                obj = self._objects.get(oid)
                if obj is None or obj.owner is None:
                    continue
                if via_task:
                    obj.via_task = True
                else:
                    obj.registered += 1
                    by_owner.setdefault(obj.owner, []).append(oid)
        for owner, oids in by_owner.items():
            self.send_to_owner(owner, ("borrow", oids, self.worker_id))

    def take_task_borrows(self) -> list[tuple[bytes, Address]]:
        """Refs that arrived as task arguments and are still alive: the caller registers them."""
        kept = []
        with self._lock:
            for oid, obj in self._objects.items():
                if obj.via_task:
                    obj.via_task = False
                    obj.registered += 1
                    kept.append((oid, obj.owner))
        return kept

    def pin(self, object_ids: Iterable[bytes]) -> None:
        """Keep objects alive on behalf of something that is not an ObjectRef (a task, a value)."""
        with self._lock:
            for oid in object_ids:
                obj = self._objects.get(oid)
                if obj is not None:
                    obj.count += 1

    def pin_nested(self, nested: list[tuple[bytes, Address]], registered: bool) -> list[bytes]:
        """Pin the refs a value contains; `registered`: their owners already count us."""
        ids = []
        with self._lock:
            for oid, owner in nested:
                if owner == self.address:
                    owner = None
                obj = self._objects.get(oid)
                if obj is None:
                    obj = self._objects[oid] = ObjectEntry(owner)
                obj.count += 1
                if registered and owner is not None:
                    obj.registered += 1
                ids.append(oid)
        return ids

    def remove_local_ref(self, object_id: bytes) -> None:
        # Applied by the next API call (submit, get, put, wait) or within RELEASE_SECONDS:
        # waking the I/O thread for every dropped ref would cost a syscall per task.
        self._released.append(object_id)
        if not self._release_pending:
            self._release_pending = True
            self.reactor.call_later(RELEASE_SECONDS, self._release_tick)

    def _release_tick(self) -> None:
        self._release_pending = False
        self.process_released()

    def unpin(self, object_ids: Iterable[bytes]) -> None:
        self._released.extend(object_ids)
        self.reactor.call_soon(self.process_released)

    def process_released(self) -> None:
        """Apply pending decrements; free objects nobody refers to any more."""
        if self._watches:
            self.check_watches()  # a watch may hold the last refs to objects (waiting.py)
        self.apply_released()

    def apply_released(self) -> None:
        """Apply the decrements of refs dropped so far (process_released, minus the watches)."""
        released = self._released
        if not released:
            return
        frees: list[tuple[bytes, ObjectEntry]] = []
        with self._lock:
            objects = self._objects
            while released:
                oid = released.popleft()
                obj = objects.get(oid)
                if obj is None:
                    continue
                obj.count -= 1
                if obj.count <= 0 and not obj.borrowers:
                    self._drop(oid, obj, frees)
        if frees:
            self._finish_frees(frees)

    def _drop(self, oid: bytes, obj: ObjectEntry, frees: list) -> None:
        """Forget an object (lock held); what must be said to others goes to `frees`."""
        del self._objects[oid]
        frees.append((oid, obj))
        for inner in obj.nested or ():
            inner_obj = self._objects.get(inner)
            if inner_obj is not None:
                inner_obj.count -= 1
                if inner_obj.count <= 0 and not inner_obj.borrowers:
                    self._drop(inner, inner_obj, frees)

    def _finish_frees(self, frees: list[tuple[bytes, ObjectEntry]]) -> None:
        store_frees: dict[str, list[bytes]] = {}
        unborrows: dict[tuple, list[tuple[bytes, int]]] = {}
        for oid, obj in frees:
            if obj.owner is None:
                value = obj.value
                if value is not None and value[0] == "s":
                    store_frees.setdefault(value[1], []).append(oid)
                elif value is not None and value[0] == "actor" and not self.shutting_down:
                    self.background(self.actors.out_of_scope, oid)
                self.submitter.forget_object(oid)
            elif obj.registered:
                unborrows.setdefault(obj.owner, []).append((oid, obj.registered))
        if store_frees:
            with self._lock:
                for oids in list(store_frees.values()):
                    for oid in oids:
                        for node_id in self._locations.pop(oid, ()):
                            store_frees.setdefault(node_id, []).append(oid)
        for node_id, oids in store_frees.items():
            self.free_in_store(node_id, oids)
        for owner, items in unborrows.items():
            self.send_to_owner(owner, ("unborrow", items, self.worker_id))

    def send_to_owner(self, owner: Address, message: tuple) -> None:
        def send(conn: Connection | None) -> None:
            if conn is not None:
                conn.send(message)

        self.peer_async(owner, send)

    def add_location(self, oid: bytes, node_id: str) -> None:
        """Another node holds a copy of an object we own: free it there too, later."""
        with self._lock:
            if oid in self._objects:
                self._locations.setdefault(oid, set()).add(node_id)

    def _on_add_location(self, conn: Connection, message: tuple) -> None:
        self.add_location(message[1], message[2])

    def _on_process_death(self, event: dict) -> None:
        """A process died somewhere: whatever it borrowed from us is released."""
        self.forget_borrower(bytes.fromhex(event["worker_id"]))

    def lend(self, refs: list[tuple[bytes, Address | None]], borrower: bytes) -> None:
        """Register `borrower` with the owner of each (object id, owner) (None: ours)."""
        by_owner: dict[tuple, list[bytes]] = {}
        for oid, owner in refs:
            owner = None if owner is None or tuple(owner) == self.address else tuple(owner)
            by_owner.setdefault(owner, []).append(oid)
        for owner, oids in by_owner.items():
            if owner is None:
                self._on_borrow(None, ("borrow", oids, borrower))
            else:
                self.send_to_owner(owner, ("borrow", oids, borrower))

    def _on_borrow(self, conn: Connection, message: tuple) -> None:
        _, oids, borrower = message
        if not self._watching_deaths:
            self._watching_deaths = True
            self.background(self.watcher.ensure_running)
        with self._lock:
            for oid in oids:
                obj = self._objects.get(oid)
                if obj is not None and obj.owner is None:
                    if obj.borrowers is None:
                        obj.borrowers = {}
                    obj.borrowers[borrower] = obj.borrowers.get(borrower, 0) + 1

    def _on_unborrow(self, conn: Connection, message: tuple) -> None:
        _, items, borrower = message
        frees: list = []
        with self._lock:
            for oid, n in items:
                obj = self._objects.get(oid)
                if obj is None or obj.borrowers is None:
                    continue
                left = obj.borrowers.get(borrower, 0) - n
                if left:
                    obj.borrowers[borrower] = left
                else:
                    obj.borrowers.pop(borrower, None)
                if obj.count <= 0 and not obj.borrowers:
                    self._drop(oid, obj, frees)
        if frees:
            self._finish_frees(frees)

    def forget_borrower(self, borrower: bytes) -> None:
        """A borrowing process died: drop what it held."""
        frees: list = []
        with self._lock:
            for oid, obj in list(self._objects.items()):
                if obj.borrowers and obj.borrowers.pop(borrower, None) is not None:
                    if obj.count <= 0 and not obj.borrowers:
                        self._drop(oid, obj, frees)
        if frees:
            self._finish_frees(frees)

    # -- owned objects ----------------------------------------------------------------------
    def new_owned(self, object_id: bytes) -> None:
        """Start tracking an object this process will own (a put or a task return)."""
        with self._lock:
            self._objects[object_id] = ObjectEntry(None)

    def set_value(self, object_id: bytes, payload: Payload) -> bool:
        """Record an object's payload and wake whoever waits; False if nobody refers to it."""
        with self._lock:
            obj = self._objects.get(object_id)
            if obj is None:
                callbacks = None
            else:
                obj.value = payload
                obj.fetching = False
                callbacks, obj.callbacks = obj.callbacks, None
                if self._watches:
                    self.note_ready_in_watches(object_id)
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
