"""`Queue`: a first-in, first-out queue shared by a driver, tasks and actors, as Ray's.

The items live in an async actor (one `asyncio.Queue` on its event loop), so every process
that holds the `Queue` object talks to the same queue: the object only carries the actor's
handle, and pickles with it into tasks and actors. A blocking `get`/`put` is one actor call
that waits on the actor's event loop (no polling): it returns as soon as another process puts
(gets) an item, or raises `Empty` (`Full`) once its timeout passes.

`Empty` and `Full` subclass the standard library's `queue.Empty` and `queue.Full`, as Ray's do.
"""

from __future__ import annotations

import asyncio
import queue as _stdlib_queue
from collections.abc import Iterable
from typing import Any

from redray import api


class Empty(_stdlib_queue.Empty):
    """Raised by get on an empty queue (at once, or once the timeout passed)."""


class Full(_stdlib_queue.Full):
    """Raised by put on a full queue (at once, or once the timeout passed)."""


# The queue actor answers (OK, value) or (EMPTY/FULL, message): an expected outcome is a
# reply, not a remote exception with a traceback to build and ship.
_OK, _EMPTY, _FULL = 0, 1, 2


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")


def _unwrap(reply: tuple[int, Any]) -> Any:
    status, value = reply
    if status == _OK:
        return value
    raise (Empty if status == _EMPTY else Full)(value)


class Queue:
    """A FIFO queue on the cluster, with the interface of Ray's `ray.util.queue.Queue`.

    maxsize <= 0 means unbounded. actor_options go to the queue actor's `.options(...)`
    (e.g. `{"num_cpus": 1}` or a name for a named, detached queue).

    >>> q = Queue(maxsize=2)
    >>> q.put(1); q.put_nowait_batch([2])
    >>> q.get(), q.get_nowait_batch(1)
    (1, [2])
    """

    def __init__(self, maxsize: int = 0, actor_options: dict[str, Any] | None = None) -> None:
        self.maxsize = maxsize
        self.actor = _actor_class().options(**(actor_options or {})).remote(maxsize)

    def __len__(self) -> int:
        return self.size()

    def size(self) -> int:
        """The number of items in the queue."""
        return api.get(self.actor.qsize.remote())

    def qsize(self) -> int:
        """The number of items in the queue."""
        return self.size()

    def empty(self) -> bool:
        """Whether the queue is empty."""
        return api.get(self.actor.empty.remote())

    def full(self) -> bool:
        """Whether the queue is full (never, when unbounded)."""
        return api.get(self.actor.full.remote())

    # -- put --------------------------------------------------------------------------------
    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Add an item; when full, wait (up to timeout s) if block, else raise Full at once."""
        _unwrap(api.get(self._put_ref(item, block, timeout)))

    async def put_async(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """put for async code: awaits the queue actor instead of blocking a thread."""
        _unwrap(await self._put_ref(item, block, timeout))

    def _put_ref(self, item: Any, block: bool, timeout: float | None) -> Any:
        if not block:
            return self.actor.put_nowait.remote(item)
        _check_timeout(timeout)
        return self.actor.put.remote(item, timeout)

    def put_nowait(self, item: Any) -> None:
        """put(item, block=False): raise Full at once when the queue is full."""
        self.put(item, block=False)

    def put_nowait_batch(self, items: Iterable[Any]) -> None:
        """Add all items, in order, or none of them (Full) when they do not all fit."""
        if not isinstance(items, Iterable):
            raise TypeError("Argument 'items' must be an Iterable")
        _unwrap(api.get(self.actor.put_nowait_batch.remote(list(items))))

    # -- get --------------------------------------------------------------------------------
    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the oldest item; when empty, wait (up to timeout s) if block,
        else raise Empty at once."""
        return _unwrap(api.get(self._get_ref(block, timeout)))

    async def get_async(self, block: bool = True, timeout: float | None = None) -> Any:
        """get for async code: awaits the queue actor instead of blocking a thread."""
        return _unwrap(await self._get_ref(block, timeout))

    def _get_ref(self, block: bool, timeout: float | None) -> Any:
        if not block:
            return self.actor.get_nowait.remote()
        _check_timeout(timeout)
        return self.actor.get.remote(timeout)

    def get_nowait(self) -> Any:
        """get(block=False): raise Empty at once when the queue is empty."""
        return self.get(block=False)

    def get_nowait_batch(self, num_items: int) -> list[Any]:
        """Remove and return the num_items oldest items, or none (Empty) if there are fewer."""
        if not isinstance(num_items, int):
            raise TypeError("Argument 'num_items' must be an int")
        if num_items < 0:
            raise ValueError("'num_items' must be nonnegative")
        return _unwrap(api.get(self.actor.get_nowait_batch.remote(num_items)))

    # -- end --------------------------------------------------------------------------------
    def shutdown(self, force: bool = False, grace_period_s: int = 5) -> None:
        """Stop the queue actor (its items are lost; blocked callers get ActorDiedError).

        Without force the actor is asked to exit and killed if it has not within
        grace_period_s seconds; with force it is killed at once.
        """
        if self.actor is not None:
            if force:
                api.kill(self.actor, no_restart=True)
            else:
                done = self.actor.__ray_terminate__.remote()
                _, not_done = api.wait([done], timeout=grace_period_s)
                if not_done:
                    api.kill(self.actor, no_restart=True)
        self.actor = None


class _QueueActor:
    """The queue itself: an asyncio.Queue on the actor's event loop (every call runs there)."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.queue: asyncio.Queue = asyncio.Queue(maxsize)

    def qsize(self) -> int:
        return self.queue.qsize()

    def empty(self) -> bool:
        return self.queue.empty()

    def full(self) -> bool:
        return self.queue.full()

    async def put(self, item: Any, timeout: float | None = None) -> tuple[int, Any]:
        if not self.queue.full():  # room now: even timeout=0 succeeds
            self.queue.put_nowait(item)
            return _OK, None
        try:
            await asyncio.wait_for(self.queue.put(item), timeout)
        except asyncio.TimeoutError:
            return _FULL, f"The queue stayed full for {timeout} s."
        return _OK, None

    async def get(self, timeout: float | None = None) -> tuple[int, Any]:
        if not self.queue.empty():
            return _OK, self.queue.get_nowait()
        try:
            return _OK, await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return _EMPTY, f"The queue stayed empty for {timeout} s."

    def put_nowait(self, item: Any) -> tuple[int, Any]:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            return _FULL, f"The queue is full (maxsize {self.maxsize})."
        return _OK, None

    def put_nowait_batch(self, items: list[Any]) -> tuple[int, Any]:
        if self.maxsize > 0 and len(items) + self.queue.qsize() > self.maxsize:
            return _FULL, (
                f"Cannot add {len(items)} items to queue of size {self.queue.qsize()} "
                f"and maxsize {self.maxsize}."
            )
        for item in items:
            self.queue.put_nowait(item)
        return _OK, None

    def get_nowait(self) -> tuple[int, Any]:
        try:
            return _OK, self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return _EMPTY, "The queue is empty."

    def get_nowait_batch(self, num_items: int) -> tuple[int, Any]:
        if num_items > self.queue.qsize():
            return _EMPTY, f"Cannot get {num_items} items from queue of size {self.queue.qsize()}."
        return _OK, [self.queue.get_nowait() for _ in range(num_items)]


_remote_queue_actor: Any = None


def _actor_class() -> Any:
    """The remote class of the queue actor (made once: the class is exported once)."""
    global _remote_queue_actor
    if _remote_queue_actor is None:
        _remote_queue_actor = api.remote(_QueueActor)
    return _remote_queue_actor


__all__ = ["Empty", "Full", "Queue"]
