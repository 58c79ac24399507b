"""The actors of a `Pool` and the chunks waiting for them.

Chunks go to whichever actor has the fewest in flight (at most `DEPTH` each, so an actor
never idles between two chunks and a slow chunk holds up at most one other), much as the
standard library's workers take tasks from one queue. A result thread, the only one that
completes results and runs callbacks, takes each finished chunk off a queue that the
runtime's completion callbacks feed, then hands out more chunks.

Threads: `_lock` guards the slots, the waiting jobs and the counters; user threads submit
under it and the result thread dispatches under it. Results are completed outside it.
"""

from __future__ import annotations

import collections
import functools
import logging
import queue
import threading
from typing import Any

from redray.api import get, kill, wait
from redray.exceptions import ActorDiedError, RayActorError
from redray.util.multiprocessing.pool_actor import PoolActor
from redray.util.multiprocessing.results import _Job

log = logging.getLogger(__name__)

DEPTH = 2  # chunks in flight per actor
RUN, CLOSE, TERMINATE = "run", "close", "terminate"
_RETIRED_KEPT = 64  # termination calls remembered for join() before finished ones are dropped


class _Slot:
    """One process of the pool: its actor, placement and the chunks it was given."""

    __slots__ = ("handle", "strategy", "assigned", "inflight")

    def __init__(self, handle: Any, strategy: Any):
        self.handle = handle
        self.strategy = strategy
        self.assigned = 0
        self.inflight = 0


class Dispatcher:
    """Owns a pool's actors; gives them chunks of its jobs and completes the results."""

    def __init__(
        self,
        actor_options: dict[str, Any],
        initializer: Any,
        initargs: Any,
        strategies: list[Any],
        maxtasksperchild: int | None,
    ):
        self._actor_options = actor_options
        self._initializer = initializer
        self._initargs = initargs
        self._maxtasks = maxtasksperchild
        self._lock = threading.Lock()
        self._state = RUN
        self._jobs: collections.deque[_Job] = collections.deque()
        self._inflight = 0
        self._next_slot = 0
        self._retired: list[Any] = []  # their __ray_terminate__ calls, for join()
        self._draining: set[_Slot] = set()  # retired, with chunks still in flight
        self._finished = queue.SimpleQueue()
        self._slots = [self._new_slot(strategy) for strategy in strategies]
        try:
            get([slot.handle.ping.remote() for slot in self._slots])
        except BaseException:
            for slot in self._slots:
                kill(slot.handle)
            raise
        self._thread = threading.Thread(
            target=self._handle_results, name="redray-pool-results", daemon=True
        )
        self._thread.start()

    def __len__(self) -> int:
        return len(self._slots)

    # -- user threads -----------------------------------------------------------------------
    def submit(self, job: _Job) -> None:
        with self._lock:
            if self._state != RUN:
                raise ValueError("Pool not running")
            self._jobs.append(job)
            self._dispatch_locked()

    def close(self) -> None:
        """No more jobs; the actors exit once the submitted ones are done."""
        with self._lock:
            if self._state == RUN:
                self._state = CLOSE
                self._finish_if_idle_locked()

    def terminate(self) -> None:
        """Kill the actors now; results not yet in fail with ActorDiedError."""
        with self._lock:
            if self._state == TERMINATE:
                return
            if self._thread.is_alive() or self._state == RUN:
                self._state = TERMINATE
            gone = ActorDiedError("The pool was terminated before this call ran.")
            for job in self._jobs:
                for index in job.abandon():
                    self._finished.put((job, index, None, gone))
            self._jobs.clear()
            slots = [*self._slots, *self._draining]
            self._slots = []
            self._finish_if_idle_locked()
        for slot in slots:
            kill(slot.handle)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the result thread and the actors' graceful exits."""
        self._thread.join(timeout)
        with self._lock:
            retired, self._retired = self._retired, []
        if retired:
            wait(retired, num_returns=len(retired), timeout=timeout)

    def kick(self) -> None:
        """A job may take chunks again (its consumer caught up): hand them out."""
        with self._lock:
            if self._state != TERMINATE:
                self._dispatch_locked()

    @property
    def running(self) -> bool:
        return self._state == RUN

    # -- dispatching (under _lock) ----------------------------------------------------------
    def _new_slot(self, strategy: Any) -> _Slot:
        options = dict(self._actor_options)
        if strategy is not None:
            options["scheduling_strategy"] = strategy
        handle = PoolActor.options(**options).remote(self._initializer, self._initargs)
        return _Slot(handle, strategy)

    def _retire(self, slot: _Slot) -> None:
        """Let the slot's actor exit after the calls it has (a fresh one takes its place)."""
        self._retired.append(slot.handle.__ray_terminate__.remote())
        if slot.inflight:
            self._draining.add(slot)
        if len(self._retired) > _RETIRED_KEPT:
            _, self._retired = wait(self._retired, num_returns=len(self._retired), timeout=0)

    def _free_slot_locked(self) -> int | None:
        best = None
        count = len(self._slots)
        for offset in range(count):
            index = (self._next_slot + offset) % count
            inflight = self._slots[index].inflight
            if inflight < DEPTH and (best is None or inflight < self._slots[best].inflight):
                best = index
                if inflight == 0:
                    break
        if best is not None:
            self._next_slot = (best + 1) % count
        return best

    def _dispatch_locked(self) -> None:
        while self._jobs:
            index = self._free_slot_locked()
            if index is None:
                return
            taken = job = None
            for job in list(self._jobs):  # the oldest job that may go on
                if not job.may_take():
                    continue
                taken = job.take_chunk()
                if taken is not None:
                    break
                self._jobs.remove(job)
            if taken is None or job is None:
                return
            chunk_index, chunk = taken
            if isinstance(chunk, BaseException):  # the caller's iterable raised
                self._finished.put((job, chunk_index, None, chunk))
                continue
            slot = self._slots[index]
            ref = slot.handle.run_batch.remote(job.func, chunk)
            slot.inflight += 1
            slot.assigned += 1
            self._inflight += 1
            if self._maxtasks is not None and slot.assigned >= self._maxtasks:
                self._slots[index] = self._new_slot(slot.strategy)
                self._retire(slot)
            ref.future().add_done_callback(
                functools.partial(_report, self._finished, job, chunk_index, slot)
            )

    def _finish_if_idle_locked(self) -> None:
        if self._inflight or self._state == RUN:
            return
        if self._state == CLOSE and self._jobs:
            return
        for slot in self._slots:
            self._retire(slot)
        self._slots = []
        self._finished.put(None)

    # -- the result thread ------------------------------------------------------------------
    def _handle_results(self) -> None:
        while True:
            item = self._finished.get()
            if item is None:
                return
            job, index, slot, outcome = item
            if slot is None:
                ok, value = False, outcome
            else:
                ok, value = _outcome(outcome)
            job._set(index, ok, value)
            if slot is None:
                continue
            with self._lock:
                slot.inflight -= 1
                self._inflight -= 1
                if not slot.inflight:
                    self._draining.discard(slot)
                if not ok and isinstance(value, RayActorError):
                    self._replace_dead_locked(slot)
                if self._state != TERMINATE:
                    self._dispatch_locked()
                self._finish_if_idle_locked()

    def _replace_dead_locked(self, slot: _Slot) -> None:
        for index, current in enumerate(self._slots):
            if current is slot and self._state != TERMINATE:
                log.warning("A pool actor died; starting another in its place.")
                self._slots[index] = self._new_slot(slot.strategy)


def _report(finished: queue.SimpleQueue, job: _Job, index: int, slot: _Slot, future: Any) -> None:
    # On the runtime's thread that settled the future: hand over, never block it.
    finished.put((job, index, slot, future))


def _outcome(future: Any) -> tuple[bool, Any]:
    try:
        return future.result()
    except Exception as exc:  # the actor died, or the chunk could not be sent or run
        return False, exc
