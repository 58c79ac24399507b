"""`wait` on a list of refs, at a cost per call that does not grow with the list in the usual
loop::

    while not_ready:
        ready, not_ready = redray.wait(not_ready)

Checking a list as Ray does (only ObjectRefs, no duplicates) and finding which of its
objects are ready take a pass over the list each, so that loop is quadratic. Instead each
thread keeps a `ListWatch` of the list `wait` last returned to it: the list's ids, and the
subset known to be ready, kept current by `set_value` as results arrive. A call with an equal
list (compared element by element, by identity first: C speed) skips the checks and reads
readiness from the watch; if it must sleep, `set_value` wakes it once enough of *its*
objects are ready (not on every result).

A watch holds the refs of the list it returned, so it must never keep an object alive that
the caller dropped: it is dropped as soon as that list is no longer referenced elsewhere or
was changed in place (checked on every API call and every RELEASE_SECONDS), when the thread
waits on another list, and after IDLE_SECONDS without use.

`Waiting` works on the process's reference table (its entries and lock); the object I/O
part (object_io.py) makes it and tells it when objects become ready or pending again.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from itertools import compress, count, islice
from typing import Any

from redray.core.object_ref import ObjectRef
from redray.core.ownership import RELEASE_SECONDS, Ownership
from redray.core.reference_table import ReferenceTable
from redray.transport.reactor import Reactor, Waiter

IDLE_SECONDS = 1.0  # a watch not used for this long is dropped


class ListWatch:
    """What is known about the list of refs `wait` last returned to one thread."""

    __slots__ = (
        "refs",
        "returned",
        "ids",
        "members",
        "ready",
        "fetching",
        "busy",
        "used",
        "need",
        "wake",
    )

    def __init__(self, refs: list[ObjectRef], ids: list[bytes], members: set[bytes]):
        self.refs = list(refs)  # our copy, compared with the caller's next list
        self.returned = refs  # the caller's list: alive while the caller still holds it
        self.ids = ids  # ids of refs, in order
        self.members = members  # set(ids); `set_value` adds those that become ready here
        self.ready: set[bytes] = set()  # members whose payload is known here
        self.fetching = False  # borrowed members have been asked of their owners
        self.busy = False  # a `wait` call of the owning thread is using it
        self.used = time.monotonic()
        self.need = 0  # how many of ready the sleeping caller waits for
        self.wake: Waiter | None = None  # set by set_value when `need` are ready

    def stale(self, now: float) -> bool:
        """True when holding the refs could keep alive an object the caller dropped."""
        return (
            sys.getrefcount(self.returned) <= 2  # only this watch (and the call) holds it
            or self.returned != self.refs  # changed in place
            or now - self.used > IDLE_SECONDS
        )


class Waiting:
    """`wait` over lists of refs, with one watch per thread (guarded by the table's lock)."""

    def __init__(
        self,
        refs: ReferenceTable,
        ownership: Ownership,
        reactor: Reactor,
        start_fetches: Callable[[list[ObjectRef]], None],
        block: Callable[[Callable[[], Any]], Any],
    ):
        self._lock = refs.lock
        self._objects = refs.objects
        self._ownership = ownership
        self.reactor = reactor
        self._start_fetches = start_fetches  # ask owners for the borrowed objects among refs
        self._block = block  # wait, lending the CPU back while a task blocks
        self._watches: dict[int, ListWatch] = {}  # per thread: the list `wait` returned to it
        self._watch_timer = False

    @property
    def watching(self) -> bool:
        return bool(self._watches)

    def wait_refs(
        self, refs: list[ObjectRef], num_returns: int, timeout: float | None
    ) -> tuple[list[ObjectRef], list[ObjectRef]]:
        """Split a non-empty list into (ready, not ready) as `redray.wait` does."""
        watch = self._watch_of(refs)  # marked busy: kept while this call uses it
        try:
            # Drops made so far count now, as on every API call; a watch of this thread's
            # previous list went in _watch_of, other threads' are checked by the timer.
            self._ownership.apply_released()
            if num_returns <= 0:
                raise ValueError(f"Invalid number of objects to return {num_returns}.")
            if num_returns > len(refs):
                raise ValueError(
                    "num_returns cannot be greater than the number of objects provided to ray.wait."
                )
            if len(watch.ready) < num_returns:
                if not watch.fetching:
                    watch.fetching = True
                    self._start_fetches(refs)
                if timeout is None or timeout > 0:
                    self._block(lambda: self._until_ready(watch, num_returns, timeout))
            return self._split(watch, refs, num_returns)
        finally:
            watch.busy = False

    def _watch_of(self, refs: list[ObjectRef]) -> ListWatch:
        """This thread's watch if `refs` equals its list, else a new one (checking `refs`)."""
        thread = threading.get_ident()
        watch = self._watches.get(thread)
        if watch is not None and type(refs) is list and watch.refs == refs:
            with self._lock:
                if self._watches.get(thread) is watch:  # not dropped meanwhile
                    watch.busy = True
                    return watch
        n = len(refs)
        if list(map(type, refs)).count(ObjectRef) != n:
            bad = next(type(r) for r in refs if type(r) is not ObjectRef)
            raise TypeError(f"wait() expected a list of ray.ObjectRef, got list containing {bad}")
        ids = [r._id for r in refs]
        members = set(ids)
        if len(members) != n:
            raise ValueError("Wait requires a list of unique object refs.")
        watch = ListWatch(refs, ids, members)
        watch.busy = True
        with self._lock:
            objects = self._objects
            for oid in ids:
                obj = objects.get(oid)
                if obj is not None and obj.value is not None:
                    watch.ready.add(oid)
            old = self._watches.get(thread)
            self._watches[thread] = watch
            arm = not self._watch_timer
            self._watch_timer = True
        if arm:
            self.reactor.call_later(RELEASE_SECONDS, self._watch_tick)
        del old  # its refs may go now (outside the lock: their __del__ may run)
        return watch

    def _until_ready(self, watch: ListWatch, num: int, timeout: float | None) -> None:
        """Sleep until `num` of the watch's objects are ready or timeout passes.

        The sleeper has a waiter of its own that `set_value` sets once `num` are ready: one
        wake-up per call (and while it sleeps, it runs the reactor loop: see Reactor.block).
        """
        wake = self.reactor.waiter()
        with self._lock:
            if len(watch.ready) >= num:
                return
            watch.need = num
            watch.wake = wake
        try:
            self.reactor.block(wake, timeout, spin=True)
        finally:
            with self._lock:
                watch.wake = None

    def _split(
        self, watch: ListWatch, refs: list[ObjectRef], num: int
    ) -> tuple[list[ObjectRef], list[ObjectRef]]:
        """Take the first `num` ready refs (in list order) out of refs; update the watch."""
        ids = watch.ids
        with self._lock:
            found = watch.ready.__contains__  # C speed: stops at the num-th ready one
            chosen = list(islice(compress(count(), map(found, ids)), num))
            for i in chosen:
                watch.members.discard(ids[i])
                watch.ready.discard(ids[i])
        ready = [refs[i] for i in chosen]
        # One copy for the caller; the watch's own lists shrink in place (a copy of a long
        # list costs more in reference counts than in bytes moved).
        not_ready = refs.copy()
        mine = watch.refs
        for i in reversed(chosen):
            del not_ready[i], mine[i], ids[i]
        watch.returned = not_ready
        watch.used = time.monotonic()
        if not not_ready:  # nothing left to wait on: the watch has served
            with self._lock:
                if self._watches.get(threading.get_ident()) is watch:
                    del self._watches[threading.get_ident()]
        return ready, not_ready

    def note_ready(self, object_id: bytes) -> None:
        """An object's payload became known here (lock held): tell the watches listing it."""
        for watch in self._watches.values():
            if object_id in watch.members:
                ready = watch.ready
                ready.add(object_id)
                if watch.wake is not None and len(ready) >= watch.need:
                    watch.wake.set()
                    watch.wake = None

    def note_pending(self, object_ids: list[bytes]) -> None:
        """Objects are being made anew (lock held): no longer ready for any watch."""
        for watch in self._watches.values():
            watch.ready.difference_update(object_ids)

    def check_watches(self) -> None:
        """Drop the watches that might keep alive refs their thread no longer holds."""
        if not self._watches:
            return
        now = time.monotonic()
        # Compared outside the lock: a list changed in place may hold objects whose __eq__
        # is the caller's code. A watch in use (busy) is left alone.
        stale = [(t, w) for t, w in list(self._watches.items()) if not w.busy and w.stale(now)]
        if not stale:
            return
        with self._lock:
            dropped = [
                self._watches.pop(t) for t, w in stale if self._watches.get(t) is w and not w.busy
            ]
        del stale, dropped  # outside the lock: the refs' __del__ may run now

    def _watch_tick(self) -> None:
        """Every RELEASE_SECONDS while there are watches: drop stale ones, apply releases."""
        self._ownership.process_released()  # checks the watches first
        with self._lock:
            again = self._watch_timer = bool(self._watches)
        if again:
            self.reactor.call_later(RELEASE_SECONDS, self._watch_tick)
