"""The caller's side of generator tasks: the stream of items a generator task yields, and
`ObjectRefGenerator` / `DynamicObjectRefGenerator`, through which user code reads them.

A generator task (`num_returns="streaming"`, the default for generator functions) reports
each item to its caller as one `gen_item` message on the connection its reply will use, as
soon as the generator yields it; the final reply ends the stream. The caller owns every
item, as it owns a task's returns: an item is an ObjectRef held by the stream until the
reader takes it, then by the reader. With `_generator_backpressure_num_objects=N` the
generator pauses once N items are yielded and not yet taken; the caller acks what its
reader took (`gen_ack`) only while the generator may be paused.

A task run again after its worker died reports only the items its caller does not have yet
(the push says how many it has), so each index reaches the reader once.

Threads: items and the final reply arrive on the reactor thread; readers are user threads
or event loops. `ItemStream.lock` guards a stream's state; callbacks run outside it.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redray import exceptions
from redray.core import context
from redray.core.ids import item_id
from redray.core.object_ref import ObjectRef
from redray.core.serialization import dumps, unpickle_error

if TYPE_CHECKING:
    import asyncio

UNBOUNDED = 1 << 62  # an ack that lets a generator run on without waiting for its reader
_TAKE_END = object()  # the stream is over: StopIteration
_TAKE_ERROR = object()  # the stream is over and its error is yet to be shown: the task's ref
STREAMING, DYNAMIC, FIXED = "streaming", "dynamic", "fixed"


class ItemStream:
    """The items of one generator task, on its caller's side.

    `kind`: STREAMING (read through an ObjectRefGenerator while the task runs), DYNAMIC (one
    ref to a DynamicObjectRefGenerator of them all, set when the task ends) or FIXED (a
    generator function called with an integer num_returns: its items are its returns, and
    nothing streams)."""

    def __init__(
        self,
        task: Any,
        kind: str,
        count: int,
        backpressure: int,
        objects: Any,
        ownership: Any,
        address: Any,
    ):
        self.task = task  # the submitter's task until it ends: where acks go (lease, actor)
        self.task_id: bytes = task.task_id
        self.kind = kind
        self.count = count  # return payloads in its final reply
        self.backpressure = backpressure if backpressure and backpressure > 0 else -1
        self._objects = objects
        self._ownership = ownership
        self._address = address  # ours: the owner of every item
        self.lock = threading.Lock()
        self.items: collections.deque[ObjectRef] = collections.deque()  # received, not taken
        self.produced = 0  # items received (indices 0..produced-1)
        self.read = 0  # items the reader took
        self.acked = 0  # the last `read` the generator was told
        self.finished = False
        self.failed = False  # it ended with an error (the task's ref holds it)
        self.error_shown = False
        self.abandoned = False  # its ObjectRefGenerator is gone: items are dropped
        self._listeners: list[Callable[[], None]] = []

    def wire(self) -> tuple:
        """What a push tells the worker: (kind, returns, backpressure, items the caller
        already has, items its reader took)."""
        with self.lock:
            self.acked = UNBOUNDED if self.abandoned else self.read
            return (self.kind, self.count, self.backpressure, self.produced, self.acked)

    # -- reactor thread ---------------------------------------------------------------------
    def on_item(self, index: int, payload: tuple) -> None:
        """Item `index` arrived; items the caller already has (from an earlier run) are
        ignored."""
        with self.lock:
            ignored = index != self.produced or self.finished
        if ignored:
            if payload[0] in ("v", "s") and payload[-1]:  # borrows made for us: give back
                self._ownership.unpin(self._ownership.pin_nested(payload[-1], registered=True))
            return
        oid = item_id(self.task_id, index)
        self._ownership.new_owned(oid)
        ref = ObjectRef(oid, self._address)
        if payload[0] in ("v", "s") and payload[-1]:
            nested = self._ownership.pin_nested(payload[-1], registered=True)
            self._objects.set_value(oid, payload, nested)
        else:
            self._objects.set_value(oid, payload)
        with self.lock:
            self.produced += 1
            if not (self.abandoned or self.finished):
                self.items.append(ref)
            ack = self._ack_due()
            listeners, self._listeners = self._listeners, []
        del ref  # (abandoned: the item is freed now)
        if ack is not None:
            self._send_ack(ack)
        for listener in listeners:
            listener()

    def finish(self, results: list) -> list:
        """The task ended (results: its final payloads); the payloads its returns get."""
        if self.kind == FIXED:
            self.task = None
            return results
        first = results[0] if results else None
        failed = first is None or first[0] == "e"
        with self.lock:
            if self.finished:
                return results
            self.finished = True
            self.failed = failed
            listeners, self._listeners = self._listeners, []
            refs = list(self.items)
            if self.kind == DYNAMIC:
                self.items.clear()
            self.task = None  # (the task holds this stream: no cycle left behind)
        for listener in listeners:
            listener()
        if self.kind != DYNAMIC:
            return results
        if failed and not isinstance(unpickle_error(first[1]), exceptions.RayTaskError):
            return results  # a system failure: getting the ref raises it
        if failed:  # raised by the generator: its error is the last item, as Ray's
            oid = item_id(self.task_id, len(refs))
            self._ownership.new_owned(oid)
            refs.append(ObjectRef(oid, self._address))
            self._objects.set_value(oid, first)
        # Inline whatever its size: this may run on the reactor thread, which must not wait
        # for the raylet to store it.
        data, inner = dumps(DynamicObjectRefGenerator(refs))
        return [("v", data, [(ref._id, ref._owner) for ref in inner])]

    # -- reader ------------------------------------------------------------------------------
    def take(self) -> Any:
        """The next item's ref, _TAKE_ERROR, _TAKE_END, or None (nothing yet)."""
        with self.lock:
            if self.items:
                ref = self.items.popleft()
                self.read += 1
                ack = self._ack_due()
            elif self.finished:
                if self.failed and not self.error_shown:
                    self.error_shown = True
                    return _TAKE_ERROR
                return _TAKE_END
            else:
                return None
        if ack is not None:
            self._send_ack(ack)
        return ref

    def ready(self) -> bool:
        """`take` would return at once."""
        with self.lock:
            return bool(self.items) or self.finished

    def listen(self, callback: Callable[[], None]) -> bool:
        """callback() once the stream changes; False (not registered) when `take` has
        something to return now."""
        with self.lock:
            if self.items or self.finished:
                return False
            self._listeners.append(callback)
            return True

    def abandon(self) -> None:
        """The reader is gone: drop what it did not take, and let the generator run on."""
        with self.lock:
            if self.abandoned:
                return
            self.abandoned = True
            dropped = list(self.items)
            self.items.clear()
            paused = not self.finished and self.backpressure > 0
            self.acked = self.produced
        del dropped
        if paused:
            self._send_ack(UNBOUNDED)

    def _ack_due(self) -> int | None:
        """(lock held) What to tell the generator, if it may be paused: once the reader took
        half a window since it was last told, or everything it was sent (one ack per half
        window, and a reader that caught up always unpauses it)."""
        window = self.backpressure
        if window <= 0 or self.finished:
            return None
        if self.abandoned:  # (an earlier ack may have reached the worker before the task)
            if self.produced - self.acked < window:
                return None
            self.acked = self.produced
            return UNBOUNDED
        read = self.read
        if self.produced - self.acked >= window and (
            read - self.acked >= (window + 1) // 2 or (read == self.produced and read > self.acked)
        ):
            self.acked = read
            return read
        return None

    def _send_ack(self, consumed: int) -> None:
        task = self.task
        if task is None:
            return
        if task.actor is not None:
            conn = task.actor.conn
        else:
            lease = task.lease
            conn = lease.conn if lease is not None else None
        if conn is not None:  # (none: it is between runs; the next push says it all)
            conn.send(("gen_ack", self.task_id, consumed))


class ObjectRefGenerator:
    """The refs a generator task yields, as it yields them: `for ref in gen`, `next(gen)`,
    `async for ref in gen`. When the task fails, the ref after the last item raises its
    error. Cannot be passed to other tasks."""

    def __init__(self, completion: ObjectRef, stream: ItemStream):
        self._generator_ref = completion
        self._stream = stream
        self._worker = context.worker()

    def __iter__(self) -> ObjectRefGenerator:
        return self

    def __next__(self) -> ObjectRef:
        return self._next_sync()

    def __aiter__(self) -> ObjectRefGenerator:
        return self

    async def __anext__(self) -> ObjectRef:
        return await self._next_async()

    def send(self, value: Any) -> None:
        raise NotImplementedError("`gen.send` is not supported.")

    def throw(self, value: Any) -> None:
        raise NotImplementedError("`gen.throw` is not supported.")

    def close(self) -> None:
        raise NotImplementedError("`gen.close` is not supported.")

    async def asend(self, value: Any) -> None:
        raise NotImplementedError("`gen.asend` is not supported.")

    async def athrow(self, value: Any) -> None:
        raise NotImplementedError("`gen.athrow` is not supported.")

    async def aclose(self) -> None:
        raise NotImplementedError("`gen.aclose` is not supported.")

    def completed(self) -> ObjectRef:
        """A ref ready when the task has ended (None, or the task's error)."""
        return self._generator_ref

    def next_ready(self) -> bool:
        """`next(gen)` would return a ref at once (False once the stream is over)."""
        with self._stream.lock:
            return bool(self._stream.items)

    def is_finished(self) -> bool:
        """The task ended and every item (and its error, if any) was taken."""
        stream = self._stream
        with stream.lock:
            return (
                stream.finished and not stream.items and (not stream.failed or stream.error_shown)
            )

    def _take(self) -> Any:
        taken = self._stream.take()
        if taken is _TAKE_ERROR:
            return self._generator_ref
        return taken

    def _next_sync(self, timeout_s: float | None = None) -> ObjectRef:
        """The next item's ref, waiting up to timeout_s (GetTimeoutError after it)."""
        taken = self._take()
        if taken is None:
            taken = self._worker.objects.blocking(lambda: self._wait(timeout_s))
        if taken is _TAKE_END:
            raise StopIteration
        return taken

    def _wait(self, timeout: float | None) -> Any:
        reactor = self._worker.reactor
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            taken = self._take()
            if taken is not None:
                return taken
            waiter = reactor.waiter()
            if not self._stream.listen(waiter.set):
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if (left is not None and left <= 0) or not reactor.block(waiter, left, spin=True):
                raise exceptions.GetTimeoutError(
                    f"The generator's next item was not ready after {timeout} s."
                )

    async def _next_async(self) -> ObjectRef:
        import asyncio  # (loaded by whoever awaits: `import redray` does not load it)

        while True:
            taken = self._take()
            if taken is _TAKE_END:
                raise StopAsyncIteration
            if taken is not None:
                return taken
            loop = asyncio.get_running_loop()
            changed = loop.create_future()

            def wake(future: asyncio.Future = changed, on: Any = loop) -> None:
                on.call_soon_threadsafe(_settle, future)

            if self._stream.listen(wake):
                self._worker.reactor.ensure_running()
                await changed

    def __del__(self) -> None:
        try:
            self._stream.abandon()
        except Exception:  # interpreter shutdown
            pass

    def __reduce__(self) -> Any:
        raise TypeError(
            "You cannot return or pass a generator to other task. "
            "Serializing a ObjectRefGenerator is not allowed."
        )

    def __repr__(self) -> str:
        return f"ObjectRefGenerator({self._generator_ref.hex()})"


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class DynamicObjectRefGenerator:
    """The value of a `num_returns="dynamic"` task: the refs of the items it yielded (the
    last one raises the generator's error, if it raised one)."""

    def __init__(self, refs: list[ObjectRef]):
        self._refs: collections.deque[ObjectRef] = collections.deque(refs)

    def __iter__(self):
        while self._refs:
            yield self._refs.popleft()

    def __len__(self) -> int:
        return len(self._refs)
