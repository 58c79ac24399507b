"""Ownership: what a process's reference counts imply for other processes.

A process owns the objects it creates (puts and the returns of tasks it submits); others
borrow them. The counts live in a `ReferenceTable` (reference_table.py); this part carries
out what they decide: it registers borrows with owners and releases them, hands the objects
this process owns and nobody counts any more to whoever frees them (`on_owned_freed`), and
forgets what a dead process borrowed.

Dropped refs are applied in batches (`remove_local_ref` queues, `process_released`
applies): by the next API call, or within RELEASE_SECONDS on the reactor thread.
"""

from __future__ import annotations

import collections
import contextvars
import logging
from collections.abc import Callable, Iterable

from redray.core.peers import Address, Peers
from redray.core.reference_table import ReferenceTable, Released
from redray.transport.connection import Connection
from redray.transport.reactor import Reactor

log = logging.getLogger(__name__)

RELEASE_SECONDS = 0.02

# The ids of refs that arrived in the running task's arguments, first seen here: they are
# registered with their owners through the task's reply (see `take_task_borrows`). A context
# variable, so each thread and each coroutine of an actor keeps its own.
_task_borrows: contextvars.ContextVar[list[bytes] | None] = contextvars.ContextVar(
    "redray_task_borrows", default=None
)


def _nothing() -> None:
    pass


class Ownership:
    """The borrow/release protocol of one process, over its reference table."""

    def __init__(self, refs: ReferenceTable, peers: Peers, reactor: Reactor, worker_id: bytes):
        self.refs = refs
        self._peers = peers
        self._reactor = reactor
        self.worker_id = worker_id
        self._released: collections.deque[bytes] = collections.deque()
        self._release_pending = False
        self._owned_freed: list[Callable[[Released], None]] = []
        # Hooks the core worker sets: what must run before releases are applied (dropping
        # `wait`'s stale watches), and how to start following process deaths.
        self.before_release: Callable[[], None] = _nothing
        self.watch_deaths: Callable[[], None] = _nothing
        self._watching_deaths = False
        peers.handle("borrow", self._on_borrow)
        peers.handle("unborrow", self._on_unborrow)

    def on_owned_freed(self, callback: Callable[[Released], None]) -> None:
        """callback(entries) runs for objects we own once nobody counts them (any thread)."""
        self._owned_freed.append(callback)

    # -- local counts -----------------------------------------------------------------------
    def add_local_ref(self, object_id: bytes, owner: Address | None) -> None:
        self.refs.add(object_id, owner)

    def count_deserialized(self, refs: list) -> list[bytes]:
        """Count refs just unpickled here (one lock for all); ids newly borrowed from others.

        `refs` are ObjectRefs or actor handles (`_id`, `_owner`). An object seen here for the
        first time and owned elsewhere is a new borrow: the caller registers those
        (`register_borrows`) once the whole value is rebuilt.
        """
        return self.refs.add_unpickled(refs)

    def new_owned(self, object_id: bytes) -> None:
        """Start tracking an object this process will own (a put or a task return)."""
        self.refs.own(object_id)

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
            self._reactor.call_later(RELEASE_SECONDS, self._release_tick)

    def _release_tick(self) -> None:
        self._release_pending = False
        self.process_released()

    def unpin(self, object_ids: Iterable[bytes]) -> None:
        self._released.extend(object_ids)
        self._reactor.call_soon(self.process_released)

    def process_released(self) -> None:
        """Apply pending decrements; free objects nobody refers to any more."""
        self.before_release()
        self.apply_released()

    def apply_released(self) -> None:
        """Apply the decrements of refs dropped so far (process_released, minus the hook)."""
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
        """Carry out releases: our objects go to whoever frees them, the owners of borrowed
        ones are told."""
        owned: Released = []
        unborrows: dict[tuple, list[tuple[bytes, int]]] = {}
        for oid, obj in frees:
            if obj.owner is None:
                owned.append((oid, obj))
            elif obj.registered:
                unborrows.setdefault(obj.owner, []).append((oid, obj.registered))
        if owned:
            for callback in self._owned_freed:
                try:
                    callback(owned)
                except Exception:
                    log.exception("freeing owned objects failed in %r", callback)
        for owner, items in unborrows.items():
            self._peers.send_to(owner, ("unborrow", items, self.worker_id))

    # -- borrower side ----------------------------------------------------------------------
    def register_borrows(self, object_ids: Iterable[bytes], via_task: bool = False) -> None:
        """Tell owners we hold refs to their objects. For the running task's arguments
        (`via_task`) they are told through the task's reply instead (`take_task_borrows`):
        the caller keeps those objects alive until the reply, and registers us first."""
        if via_task:
            _task_borrows.set(list(object_ids))
            return
        for owner, oids in self.refs.register(object_ids).items():
            self._peers.send_to(owner, ("borrow", oids, self.worker_id))

    def take_task_borrows(self) -> list[tuple[bytes, Address]]:
        """Refs that arrived in the running task's arguments and are still alive here, as
        (id, owner): the caller registers them. Costs O(refs in those arguments)."""
        oids = _task_borrows.get()
        if not oids:
            return []
        _task_borrows.set(None)
        return self.refs.register_alive(oids)

    # -- owner side -------------------------------------------------------------------------
    def lend(self, refs: list[tuple[bytes, Address | None]], borrower: bytes) -> None:
        """Register `borrower` with the owner of each (object id, owner) (None: ours)."""
        address = self._peers.address
        by_owner: dict[tuple | None, list[bytes]] = {}
        for oid, owner in refs:
            owner = None if owner is None or tuple(owner) == address else tuple(owner)
            by_owner.setdefault(owner, []).append(oid)
        for owner, oids in by_owner.items():
            if owner is None:
                self._follow_deaths()
                self.refs.borrowed(oids, borrower)
            else:
                self._peers.send_to(owner, ("borrow", oids, borrower))

    def _follow_deaths(self) -> None:
        """Borrowers are known here: follow process deaths, which release their borrows."""
        if not self._watching_deaths:
            self._watching_deaths = True
            self.watch_deaths()

    def _on_borrow(self, conn: Connection, message: tuple) -> None:
        _, oids, borrower = message
        self._follow_deaths()
        freed = self.refs.borrowed(oids, borrower)
        if freed:
            self._finish_frees(freed)

    def _on_unborrow(self, conn: Connection, message: tuple) -> None:
        _, items, borrower = message
        freed = self.refs.unborrowed(items, borrower)
        if freed:
            self._finish_frees(freed)

    def on_process_death(self, event: dict) -> None:
        """A process died somewhere (a published event): what it borrowed from us is released."""
        self.forget_borrower(bytes.fromhex(event["worker_id"]))

    def forget_borrower(self, borrower: bytes) -> None:
        """A borrowing process died: drop what it held."""
        freed = self.refs.borrower_died(borrower)
        if freed:
            self._finish_frees(freed)
