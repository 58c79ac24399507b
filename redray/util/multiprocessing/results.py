"""What `Pool` calls return: `AsyncResult` (apply/map) and the `imap` iterators.

Each is filled, chunk by chunk, by the pool's result thread (the only caller of `_set`);
callbacks run on that thread too, as in the standard library, so they must return quickly.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing import TimeoutError
from typing import Any

log = logging.getLogger(__name__)


class _Job:
    """Calls of one Pool method, cut into chunks that the pool hands to its actors."""

    def __init__(self, func: Any, chunks: Iterator[list], length: int | None):
        self.func = func
        self._chunks = chunks
        self._taken = 0
        self._length = length  # in chunks, once known

    def may_take(self) -> bool:
        """Whether the pool may start another chunk of this job now."""
        return True

    def take_chunk(self) -> tuple[int, Any] | None:
        """The next (index, chunk); None once there is none. Called under the pool's lock.

        A chunk that is an exception is one the caller's iterable raised: it fails there.
        """
        if self._length is not None and self._taken >= self._length:
            return None
        try:
            chunk: Any = next(self._chunks)
        except StopIteration:
            self._set_length(self._taken)
            return None
        except Exception as exc:
            chunk = exc
            self._set_length(self._taken + 1)
        self._taken += 1
        return self._taken - 1, chunk

    def abandon(self) -> list[int]:
        """Indexes of the chunks that will never run (the pool was terminated)."""
        if self._length is None:
            self._set_length(self._taken + 1)
        left = list(range(self._taken, self._length or 0))
        self._taken = self._length or 0
        return left

    def _set_length(self, length: int) -> None:
        self._length = length

    def _set(self, index: int, ok: bool, value: Any) -> None:
        raise NotImplementedError


class AsyncResult(_Job):
    """The result of `apply_async`, `map_async` or `starmap_async`."""

    def __init__(
        self,
        func: Any,
        chunks: Iterator[list],
        length: int,
        callback: Any = None,
        error_callback: Any = None,
        single_result: bool = False,
    ):
        super().__init__(func, chunks, length)
        self._event = threading.Event()
        self._results: list[Any] = [None] * length
        self._left = length
        self._success = True
        self._value: Any = None
        self._callback = callback
        self._error_callback = error_callback
        self._single = single_result
        if length == 0:
            self._value = []
            self._event.set()

    def ready(self) -> bool:
        """Whether every call finished (callbacks included)."""
        return self._event.is_set()

    def successful(self) -> bool:
        """Whether no call raised; ValueError while not ready."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        """Wait until ready, or for timeout seconds."""
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The result (a list for map); raises what a call raised, or TimeoutError."""
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set(self, index: int, ok: bool, value: Any) -> None:
        self._left -= 1
        if ok:
            self._results[index] = value
        elif self._success:
            self._success = False  # the first failure is the one get() raises
            self._value = value
        if self._left:
            return
        try:
            if self._success:
                self._value = (
                    self._results[0][0]
                    if self._single
                    else list(itertools.chain.from_iterable(self._results))
                )
                if self._callback is not None:
                    self._callback(self._value)
            elif self._error_callback is not None:
                self._error_callback(self._value)
        except Exception:
            log.exception("A Pool result callback raised")
        finally:
            self._results = []
            self._event.set()


class IMapIterator(_Job):
    """Results of `imap` in the order of the arguments (`imap_unordered`: as they come).

    The iterable is read as results are consumed: at most `window` chunks are taken and not
    yet consumed, so an endless iterable or a slow consumer holds bounded memory.
    """

    def __init__(
        self,
        func: Any,
        chunks: Iterator[list],
        window: int,
        on_consumed: Callable[[], None],
        ordered: bool = True,
    ):
        super().__init__(func, chunks, None)
        self._ordered = ordered
        self._window = window
        self._consumed = 0
        self._on_consumed = on_consumed
        self._cond = threading.Condition(threading.Lock())
        self._items: collections.deque = collections.deque()
        self._next_chunk = 0  # chunks handed on (in order, for imap)
        self._unsorted: dict[int, list] = {}

    def __iter__(self) -> IMapIterator:
        return self

    def next(self, timeout: float | None = None) -> Any:
        """The next result; raises what its call raised, StopIteration at the end, or
        TimeoutError when none came within timeout seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self._next_chunk == self._length:
                    raise StopIteration
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError
                self._cond.wait(remaining)
            ok, value, last_of_chunk = self._items.popleft()
            was_full = False
            if last_of_chunk:
                # (_taken cannot grow while the window is full: reading it here is safe)
                was_full = self._taken - self._consumed >= self._window
                self._consumed += 1
        if was_full:
            self._on_consumed()
        if ok:
            return value
        raise value

    __next__ = next

    def may_take(self) -> bool:
        return self._taken - self._consumed < self._window

    def _set_length(self, length: int) -> None:
        with self._cond:
            self._length = length
            self._cond.notify_all()

    def _set(self, index: int, ok: bool, value: Any) -> None:
        # (chunks are never empty) the last entry of a chunk says the chunk was consumed
        if ok:
            entries = [(True, item, False) for item in value]
            entries[-1] = (True, value[-1], True)
        else:
            entries = [(False, value, True)]
        with self._cond:
            if not self._ordered:
                self._items.extend(entries)
                self._next_chunk += 1
            elif index != self._next_chunk:
                self._unsorted[index] = entries
                return
            else:
                self._items.extend(entries)
                self._next_chunk += 1
                while self._next_chunk in self._unsorted:
                    self._items.extend(self._unsorted.pop(self._next_chunk))
                    self._next_chunk += 1
            self._cond.notify_all()


class IMapUnorderedIterator(IMapIterator):
    """Results of `imap_unordered`, in the order they finish."""

    def __init__(
        self, func: Any, chunks: Iterator[list], window: int, on_consumed: Callable[[], None]
    ):
        super().__init__(func, chunks, window, on_consumed, ordered=False)
