"""Ownership: the objects a process owns or borrows, and what their counts imply.

A process owns the objects it creates (puts and the returns of tasks it submits); others
borrow them. The counts live in a `ReferenceTable` (reference_table.py); this part carries
out what they decide: it registers borrows with owners and releases them, frees objects in
every node's store once nobody counts them, and answers borrowers asking for values.

`Ownership` is a part of `CoreWorker` (worker.py), kept here to be read on its own.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterable

from redray.core.object_ref import Address
from redray.core.reference_table import Released
from redray.transport.connection import Connection

log = logging.getLogger("redray.worker")

# An object's payload, as stored by its owner and sent to whoever asks for it:
#   ("v", pickled bytes, nested)          the value inline
#   ("s", node_id, size, nested)          the value is in node_id's shared-memory store
#   ("e", pickled exception)              the task that should make it failed
# nested: [(object_id, owner address)] of the refs the value contains.
Payload = tuple


RELEASE_SECONDS = 0.02

# The ids of refs that arrived in the running task's arguments, first seen here: they are
# registered with their owners through the task's reply (see `take_task_borrows`). A context
# variable, so each thread and each coroutine of an actor keeps its own.
_task_borrows: contextvars.ContextVar[list[bytes] | None] = contextvars.ContextVar(
    "redray_task_borrows", default=None
)


class Ownership:
    """Reference counting and the owned-object table (mixed into CoreWorker, which makes
    `self.refs`, and aliases its `objects` and `lock` as `_objects` and `_lock`)."""

    # -- reference counting -----------------------------------------------------------------
    def add_local_ref(self, object_id: bytes, owner: Address | None) -> None:
        self.refs.add(object_id, owner)

    def count_deserialized(self, refs: list) -> list[bytes]:
        """Count refs just unpickled here (one lock for all); ids newly borrowed from others.

        `refs` are ObjectRefs or actor handles (`_id`, `_owner`). An object seen here for the
        first time and owned elsewhere is a new borrow: the caller registers those
        (`register_borrows`) once the whole value is rebuilt.
        """
        return self.refs.add_unpickled(refs)

    def register_borrows(self, object_ids: Iterable[bytes], via_task: bool = False) -> None:
        """Tell owners we hold refs to their objects. For the running task's arguments
        (`via_task`) they are told through the task's reply instead (`take_task_borrows`):
        the caller keeps those objects alive until the reply, and registers us first."""
        if via_task:
            _task_borrows.set(list(object_ids))
            return
        for owner, oids in self.refs.register(object_ids).items():
            self.send_to_owner(owner, ("borrow", oids, self.worker_id))

    def take_task_borrows(self) -> list[tuple[bytes, Address]]:
        """Refs that arrived in the running task's arguments and are still alive here, as
        (id, owner): the caller registers them. Costs O(refs in those arguments)."""
        oids = _task_borrows.get()
        if not oids:
            return []
        _task_borrows.set(None)
        return self.refs.register_alive(oids)

    def pin(self, object_ids: Iterable[bytes]) -> None:
        """Keep objects alive on behalf of something that is not an ObjectRef (a task, a value)."""
        self.refs.pin(object_ids)

    def pin_nested(self, nested: list[tuple[bytes, Address]], registered: bool) -> list[bytes]:
        """Pin the refs a value contains; `registered`: their owners already count us."""
        return self.refs.pin_nested(nested, registered)

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
        oids = []
        try:
            while True:
                oids.append(released.popleft())
        except IndexError:
            pass
        freed = self.refs.release(oids)
        if freed:
            self._finish_frees(freed)

    def _finish_frees(self, frees: Released) -> None:
        """Carry out releases: free our objects in the stores holding them, tell the owners
        of borrowed ones."""
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
        by_owner: dict[tuple | None, list[bytes]] = {}
        for oid, owner in refs:
            owner = None if owner is None or tuple(owner) == self.address else tuple(owner)
            by_owner.setdefault(owner, []).append(oid)
        for owner, oids in by_owner.items():
            if owner is None:
                self._watch_deaths()
                self.refs.borrowed(oids, borrower)
            else:
                self.send_to_owner(owner, ("borrow", oids, borrower))

    def _watch_deaths(self) -> None:
        """Borrowers are known here: follow process deaths, which release their borrows."""
        if not self._watching_deaths:
            self._watching_deaths = True
            self.background(self.watcher.ensure_running)

    def _on_borrow(self, conn: Connection, message: tuple) -> None:
        _, oids, borrower = message
        self._watch_deaths()
        freed = self.refs.borrowed(oids, borrower)
        if freed:
            self._finish_frees(freed)

    def _on_unborrow(self, conn: Connection, message: tuple) -> None:
        _, items, borrower = message
        freed = self.refs.unborrowed(items, borrower)
        if freed:
            self._finish_frees(freed)

    def forget_borrower(self, borrower: bytes) -> None:
        """A borrowing process died: drop what it held."""
        freed = self.refs.borrower_died(borrower)
        if freed:
            self._finish_frees(freed)

    # -- owned objects ----------------------------------------------------------------------
    def new_owned(self, object_id: bytes) -> None:
        """Start tracking an object this process will own (a put or a task return)."""
        self.refs.own(object_id)

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
