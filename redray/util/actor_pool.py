"""`ActorPool`: spread work over a fixed set of actors, as `ray.util.ActorPool` does.

`fn(actor, value)` starts the work on an idle actor and returns its ObjectRef (or a list of
refs, for methods with several returns). An actor is busy from the moment it gets a value
until that value's result is handed out by `get_next`/`get_next_unordered` (or by the
generators of `map`/`map_unordered`); values submitted while every actor is busy wait in the
pool and start, in submission order, as actors come back.

Error behaviour follows Ray: a task's error is raised by the `get_next*` call that hands out
its result and the actor goes back to the pool, unless the actor itself died
(`ActorDiedError`), in which case it leaves the pool. A timeout raises `TimeoutError`; with
`ignore_if_timedout=True` the late task is dropped first (its actor rejoins the pool at once
and runs later work after the dropped call). Asking for a result with nothing pending raises
`StopIteration("No more results to get")`.

The private attribute names are Ray's, since code written against Ray sometimes reads them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from redray import api, exceptions
from redray.core.object_ref import ObjectRef

_TIMEOUT_MSG = "Timed out waiting for result"


def _key(future: Any) -> Any:
    """A hashable key for what fn returned: a ref, or a tuple of a method's several refs."""
    return tuple(future) if isinstance(future, list) else future


def _refs(future: Any) -> list[ObjectRef]:
    if isinstance(future, (list, tuple)):
        return [r for r in future if isinstance(r, ObjectRef)]
    return [future] if isinstance(future, ObjectRef) else []


class ActorPool:
    """Operate on a fixed pool of actors.

    >>> pool = ActorPool([Actor.remote(), Actor.remote()])
    >>> list(pool.map(lambda a, v: a.double.remote(v), [1, 2, 3, 4]))
    [2, 4, 6, 8]
    """

    def __init__(self, actors: Iterable[Any]):
        self._idle_actors: list[Any] = list(actors)
        self._future_to_actor: dict[Any, tuple[int, Any]] = {}  # key -> (index, actor)
        self._index_to_future: dict[int, Any] = {}  # index -> what fn returned
        self._next_task_index = 0  # index the next submitted value gets
        self._next_return_index = 0  # index get_next hands out next
        self._pending_submits: deque[tuple[Callable, Any]] = deque()  # waiting for an actor

    # -- submitting -------------------------------------------------------------------------
    def submit(self, fn: Callable[[Any, Any], Any], value: Any) -> None:
        """Run fn(actor, value) on an idle actor, or queue it until one is free."""
        if not self._idle_actors:
            self._pending_submits.append((fn, value))
            return
        actor = self._idle_actors.pop()
        future = fn(actor, value)
        index = self._next_task_index
        self._future_to_actor[_key(future)] = (index, actor)
        self._index_to_future[index] = future
        self._next_task_index += 1

    def map(self, fn: Callable[[Any, Any], Any], values: Iterable[Any]) -> Iterator[Any]:
        """Submit fn over every value now; returns a generator of the results in order."""
        self._drop_pending_results()
        for value in values:
            self.submit(fn, value)

        def results() -> Iterator[Any]:
            while self.has_next():
                yield self.get_next()

        return results()

    def map_unordered(self, fn: Callable[[Any, Any], Any], values: Iterable[Any]) -> Iterator[Any]:
        """Like map, but results come in the order they complete."""
        self._drop_pending_results()
        for value in values:
            self.submit(fn, value)

        def results() -> Iterator[Any]:
            while self.has_next():
                yield self.get_next_unordered()

        return results()

    def _drop_pending_results(self) -> None:
        """Forget what earlier submissions would still return (map starts afresh, as Ray).

        Finished results are discarded (their errors too); unfinished calls keep running but
        their actors rejoin the pool at once, so new work queues behind them. Values still
        waiting for an actor are dropped without being started.
        """
        self._pending_submits.clear()
        for key, (_, actor) in list(self._future_to_actor.items()):
            del self._future_to_actor[key]
            self._return_actor(actor)
        self._index_to_future.clear()
        self._next_return_index = self._next_task_index

    # -- results ----------------------------------------------------------------------------
    def has_next(self) -> bool:
        """Whether any submitted result has not been handed out yet."""
        return bool(self._future_to_actor)

    def get_next(self, timeout: float | None = None, ignore_if_timedout: bool = False) -> Any:
        """The next result in submission order, waiting up to timeout seconds for it."""
        if not self.has_next():
            raise StopIteration("No more results to get")
        if (
            self._next_return_index >= self._next_task_index
            or self._next_return_index not in self._index_to_future
        ):
            raise ValueError("It is not allowed to call get_next() after get_next_unordered().")
        future = self._index_to_future[self._next_return_index]
        timed_out = False
        if timeout is not None:
            refs = _refs(future)
            if refs:
                ready, _ = api.wait(refs, num_returns=len(refs), timeout=timeout)
                timed_out = len(ready) < len(refs)
            if timed_out and not ignore_if_timedout:
                raise TimeoutError(_TIMEOUT_MSG)
        del self._index_to_future[self._next_return_index]
        self._next_return_index += 1
        _, actor = self._future_to_actor.pop(_key(future))
        if timed_out:
            self._return_actor(actor)
            raise TimeoutError(f"{_TIMEOUT_MSG}. The task {future} has been ignored.")
        return self._result(future, actor)

    def get_next_unordered(
        self, timeout: float | None = None, ignore_if_timedout: bool = False
    ) -> Any:
        """Any finished result (the first to complete), waiting up to timeout seconds."""
        if not self.has_next():
            raise StopIteration("No more results to get")
        key = self._wait_any(timeout)
        timed_out = key is None
        if timed_out:
            if not ignore_if_timedout:
                raise TimeoutError(_TIMEOUT_MSG)
            key = next(iter(self._future_to_actor))  # drop the oldest call, as Ray
        index, actor = self._future_to_actor.pop(key)
        future = self._index_to_future.pop(index)
        self._next_return_index = max(self._next_return_index, index + 1)
        if timed_out:
            self._return_actor(actor)
            raise TimeoutError(f"{_TIMEOUT_MSG}. The task {future} has been ignored.")
        return self._result(future, actor)

    def _wait_any(self, timeout: float | None) -> Any:
        """The key of a finished submission (oldest first among those done), or None."""
        keys = list(self._future_to_actor)
        if all(isinstance(k, ObjectRef) for k in keys):
            ready, _ = api.wait(keys, num_returns=1, timeout=timeout)
            return ready[0] if ready else None
        # Some submissions have several refs: one is finished when all of its refs are.
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            refs = [r for k in keys for r in _refs(k)]
            done = set(api.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
            for k in keys:
                if all(r in done for r in _refs(k)):
                    return k
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            waiting = [r for r in refs if r not in done]
            api.wait(waiting, num_returns=1, timeout=remaining)

    def _result(self, future: Any, actor: Any) -> Any:
        """The value of a finished submission; the actor rejoins the pool unless it died."""
        alive = True
        try:
            return api.get(future)
        except exceptions.ActorDiedError:
            alive = False
            raise
        finally:
            self._return_actor(actor, alive)

    def _return_actor(self, actor: Any, alive: bool = True) -> None:
        if alive:
            self._idle_actors.append(actor)
        if self._pending_submits and self._idle_actors:
            self.submit(*self._pending_submits.popleft())

    # -- membership -------------------------------------------------------------------------
    def has_free(self) -> bool:
        """Whether an actor is idle (and no submitted value is waiting for one)."""
        return bool(self._idle_actors) and not self._pending_submits

    def pop_idle(self) -> Any:
        """Remove and return an idle actor, or None when none is free."""
        if self.has_free():
            return self._idle_actors.pop()
        return None

    def push(self, actor: Any) -> None:
        """Add an actor to the pool (it takes the oldest waiting value, if any)."""
        busy = [a for _, a in self._future_to_actor.values()]
        if actor in self._idle_actors or actor in busy:
            raise ValueError("Actor already belongs to current ActorPool")
        self._return_actor(actor)


__all__ = ["ActorPool"]
