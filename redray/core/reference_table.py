"""Reference counting for one process: the objects it owns or borrows, and who holds them.

Every process counts, per object, its live refs plus pins (tasks waiting to run with it,
values that contain it): the *local count*. An owner also counts, per borrowing process,
the borrows registered with it. Those counts are signed: a borrow is often relayed by a third
process (the caller of the task that handed the ref over) while its release comes from the
borrower itself, so the two may arrive in either order; a release seen first leaves a negative
count that the borrow brings back to zero. An object is released exactly when its local count
and every borrower's count are zero.

Two rules keep counts from lying: a process never counts itself as a borrower of its own
objects (its refs are in its local count), and borrows of a process known to be dead are
ignored (a relayed borrow may arrive after the death was announced).

Thread-safe: every method takes the table's lock and neither blocks nor calls out while
holding it. The table decides and the caller acts: methods return the entries released, whose
storage the caller frees and whose owners it tells.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

Address = tuple  # (host, port, worker_id) of a core worker's listener

DEAD_BORROWERS_KEPT = 10_000  # how many dead processes' late borrows are recognised


class ObjectEntry:
    """What this process knows of one object it owns or borrows."""

    __slots__ = (
        "owner",
        "count",
        "value",
        "callbacks",
        "borrowers",
        "registered",
        "nested",
        "fetching",
    )

    def __init__(self, owner: Address | None):
        self.owner = owner  # None when this process owns the object
        self.count = 0  # live refs here + pins
        self.value: tuple | None = None  # the payload, once known here
        self.callbacks: list[Callable[[], None]] | None = None  # run when the value is known
        self.borrowers: dict[bytes, int] | None = None  # owner side: process id -> signed count
        self.registered = 0  # borrower side: borrows of ours the owner counts
        self.nested: list[bytes] | None = None  # refs the value contains (pinned by it)
        self.fetching = False  # borrower side: asked the owner for the value

    def in_use(self) -> bool:
        return self.count > 0 or bool(self.borrowers)


Released = list[tuple[bytes, ObjectEntry]]


class ReferenceTable:
    """The objects of one process and the counts that keep them alive."""

    def __init__(self, self_id: bytes, address: Address):
        self.lock = threading.Lock()
        self.objects: dict[bytes, ObjectEntry] = {}
        self._self_id = self_id
        self._address = address
        self._borrowed_by: dict[bytes, set[bytes]] = {}  # borrower -> objects it counts on
        self._dead: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.objects)

    def _owner(self, owner: Address | None) -> Address | None:
        return None if owner is None or tuple(owner) == self._address else tuple(owner)

    def _entry(self, oid: bytes, owner: Address | None) -> ObjectEntry:
        """(lock held) The entry of oid, made if new."""
        obj = self.objects.get(oid)
        if obj is None:
            obj = self.objects[oid] = ObjectEntry(self._owner(owner))
        return obj

    # -- local counts ------------------------------------------------------------------------
    def own(self, oid: bytes) -> None:
        """Start tracking an object this process will own (a put, a task's return)."""
        with self.lock:
            self.objects[oid] = ObjectEntry(None)

    def add(self, oid: bytes, owner: Address | None) -> ObjectEntry:
        """One more local ref (or pin) to oid; the entry is made if new."""
        with self.lock:
            obj = self._entry(oid, owner)
            obj.count += 1
            return obj

    def add_unpickled(self, refs: Iterable[Any]) -> list[bytes]:
        """Count refs just rebuilt here (`_id`, `_owner`); the ids first seen here that
        are owned elsewhere: new borrows, to be registered with their owners."""
        new_borrows = []
        with self.lock:
            objects = self.objects
            for ref in refs:
                oid = ref._id
                obj = objects.get(oid)
                if obj is None:
                    obj = objects[oid] = ObjectEntry(self._owner(ref._owner))
                    if obj.owner is not None:
                        new_borrows.append(oid)
                obj.count += 1
        return new_borrows

    def pin(self, oids: Iterable[bytes]) -> None:
        """Keep known objects alive on behalf of something that is not a ref."""
        with self.lock:
            for oid in oids:
                obj = self.objects.get(oid)
                if obj is not None:
                    obj.count += 1

    def pin_nested(self, nested: Iterable[tuple[bytes, Address | None]], registered: bool):
        """Pin the refs a value contains; `registered`: their owners already count us
        (the process that sent the value registered the borrows on our behalf)."""
        ids = []
        with self.lock:
            for oid, owner in nested:
                obj = self._entry(oid, owner)
                obj.count += 1
                if registered and obj.owner is not None:
                    obj.registered += 1
                ids.append(oid)
        return ids

    def release(self, oids: Iterable[bytes]) -> Released:
        """Drop one local count per id; the entries released as a result."""
        released: Released = []
        with self.lock:
            objects = self.objects
            for oid in oids:
                obj = objects.get(oid)
                if obj is None:
                    continue
                obj.count -= 1
                if obj.count <= 0 and not obj.borrowers:
                    self._drop(oid, obj, released)
        return released

    def _drop(self, oid: bytes, obj: ObjectEntry, released: Released) -> None:
        """(lock held) Forget an object; what it contained loses a count."""
        del self.objects[oid]
        released.append((oid, obj))
        for inner in obj.nested or ():
            inner_obj = self.objects.get(inner)
            if inner_obj is not None:
                inner_obj.count -= 1
                if inner_obj.count <= 0 and not inner_obj.borrowers:
                    self._drop(inner, inner_obj, released)

    # -- owner side: borrowers ---------------------------------------------------------------
    def borrowed(self, oids: Iterable[bytes], borrower: bytes) -> Released:
        """`borrower` holds a ref to each of our objects in oids."""
        return self._change_borrows(((oid, 1) for oid in oids), borrower)

    def unborrowed(self, items: Iterable[tuple[bytes, int]], borrower: bytes) -> Released:
        """`borrower` dropped n refs to each (oid, n); the entries released as a result."""
        return self._change_borrows(((oid, -n) for oid, n in items), borrower)

    def _change_borrows(self, changes: Iterable[tuple[bytes, int]], borrower: bytes) -> Released:
        released: Released = []
        if borrower == self._self_id:
            return released  # our own refs are in the local count
        with self.lock:
            if borrower in self._dead:
                return released
            objects = self.objects
            held = self._borrowed_by.get(borrower)
            for oid, delta in changes:
                obj = objects.get(oid)
                if obj is None or obj.owner is not None:
                    continue  # released already, or not ours
                borrowers = obj.borrowers
                if borrowers is None:
                    borrowers = obj.borrowers = {}
                count = borrowers.get(borrower, 0) + delta
                if count:
                    borrowers[borrower] = count
                    if held is None:
                        held = self._borrowed_by[borrower] = set()
                    held.add(oid)
                    continue
                borrowers.pop(borrower, None)
                if held is not None:
                    held.discard(oid)
                if obj.count <= 0 and not borrowers:
                    self._drop(oid, obj, released)
            if held is not None and not held:
                del self._borrowed_by[borrower]
        return released

    def borrower_died(self, borrower: bytes) -> Released:
        """A process died: whatever it borrowed from us is released, and its late borrows
        are ignored from now on."""
        released: Released = []
        with self.lock:
            self._dead[borrower] = None
            if len(self._dead) > DEAD_BORROWERS_KEPT:
                self._dead.popitem(last=False)
            for oid in self._borrowed_by.pop(borrower, ()):
                obj = self.objects.get(oid)
                if obj is None or not obj.borrowers:
                    continue
                obj.borrowers.pop(borrower, None)
                if obj.count <= 0 and not obj.borrowers:
                    self._drop(oid, obj, released)
        return released

    def borrowers_of(self, oid: bytes) -> dict[bytes, int]:
        with self.lock:
            obj = self.objects.get(oid)
            return dict(obj.borrowers or {}) if obj is not None else {}

    # -- borrower side: registrations --------------------------------------------------------
    def register(self, oids: Iterable[bytes]) -> dict[Address, list[bytes]]:
        """Note that each borrowed object in oids is (about to be) registered with its owner
        once more; returns them by owner, for the caller to tell."""
        by_owner: dict[Address, list[bytes]] = {}
        with self.lock:
            for oid in oids:
                obj = self.objects.get(oid)
                if obj is None or obj.owner is None:
                    continue
                obj.registered += 1
                by_owner.setdefault(obj.owner, []).append(oid)
        return by_owner

    def register_alive(self, oids: Iterable[bytes]) -> list[tuple[bytes, Address]]:
        """As `register`, for objects that may have been released meanwhile: only the live
        ones count, returned as (id, owner)."""
        kept = []
        with self.lock:
            for oid in oids:
                obj = self.objects.get(oid)
                if obj is not None and obj.owner is not None:
                    obj.registered += 1
                    kept.append((oid, obj.owner))
        return kept
