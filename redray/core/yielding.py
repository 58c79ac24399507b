"""Running generator tasks and actor methods in a worker: each item goes to the caller as it
is yielded (see generators.py for the caller's side).

A push for a generator task carries, instead of a return count, `(kind, returns,
backpressure, skip, consumed)`: `skip` items the caller already has from an earlier run are
run through but not sent again, and the generator pauses while `backpressure` items it
yielded are not yet taken by the reader (`consumed`, updated by the caller's `gen_ack`).

Threads: generators run on the thread of their task or call (the main thread, an actor
group's thread, or an async actor's event loop); acks arrive on the reactor thread.
`_flows` is only added to and popped from by the running task's own thread.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable
from typing import Any

from redray import exceptions
from redray.core.generators import FIXED, UNBOUNDED
from redray.core.ids import item_id
from redray.transport.connection import Connection

_NONE_PAYLOAD = ("v", pickle.dumps(None, protocol=5), [])  # a generator task's own return


def return_count(spec: Any) -> int:
    """How many return payloads a reply carries, for a push's num_returns field."""
    return spec if type(spec) is int else spec[1]


class _Flow:
    """Backpressure of one running generator: what its reader took, and who waits."""

    __slots__ = ("consumed", "wake", "conns", "caller_gone")

    def __init__(self, consumed: int, conns: tuple[Connection, ...]):
        self.consumed = consumed
        self.wake: Callable[[], None] | None = None
        self.conns = conns  # closed: the caller is gone, nobody will take anything
        self.caller_gone = False


class GeneratorRunner:
    """Iterates generator results for the executor and reports their items."""

    def __init__(self, executor: Any):
        self._executor = executor
        self._reactor = executor.reactor
        self._flows: dict[bytes, _Flow] = {}
        executor.peers.handle("gen_ack", self._on_ack)
        executor.peers.on_closed(self._on_closed)

    # -- reactor thread ---------------------------------------------------------------------
    def _on_ack(self, conn: Connection, message: tuple) -> None:
        _, task_id, consumed = message
        flow = self._flows.get(task_id)
        if flow is None or consumed <= flow.consumed:
            return
        flow.consumed = consumed
        wake = flow.wake
        if wake is not None:
            wake()

    def _on_closed(self, conn: Connection) -> None:
        for flow in list(self._flows.values()):
            if conn in flow.conns:
                flow.caller_gone = True
                flow.consumed = UNBOUNDED
                if flow.wake is not None:
                    flow.wake()

    # -- running ----------------------------------------------------------------------------
    def run(self, ctx: Any, result: Any, spec: tuple) -> list[tuple]:
        """Iterate a generator's result (synchronously), reporting each item; the payloads
        of the task's own returns."""
        kind, count, backpressure, skip, consumed = spec
        if kind == FIXED:
            return self._fixed(ctx, list(_iterable(result, ctx.name)), count)
        items = _iterable(result, ctx.name)
        flow = self._start(ctx, backpressure, consumed)
        index = 0
        try:
            for value in items:
                if index >= skip:
                    self._report(ctx, index, value)
                index += 1
                if flow is not None and index - flow.consumed >= backpressure:
                    self._pause(flow, index, backpressure)
                    if flow.caller_gone:
                        break
        finally:
            self._stop(ctx, flow)
            close = getattr(items, "close", None)
            if close is not None:
                close()
        return self._end(ctx, index, skip, flow)

    async def run_async(self, ctx: Any, result: Any, spec: tuple) -> list[tuple]:
        """As `run`, on an async actor's event loop: `result` may be an async generator,
        and waiting for the reader never blocks the loop."""
        kind, count, backpressure, skip, consumed = spec
        if kind == FIXED:
            if hasattr(result, "__aiter__"):
                values = [value async for value in result]
            else:
                values = list(_iterable(result, ctx.name))
            return self._fixed(ctx, values, count)
        flow = self._start(ctx, backpressure, consumed)
        index = 0
        agen = result if hasattr(result, "__anext__") else None
        items = agen if agen is not None else _iterable(result, ctx.name)
        try:
            while True:
                if agen is not None:
                    try:
                        value = await agen.__anext__()
                    except StopAsyncIteration:
                        break
                else:
                    try:
                        value = next(items)
                    except StopIteration:
                        break
                if index >= skip:
                    self._report(ctx, index, value)
                index += 1
                if flow is not None and index - flow.consumed >= backpressure:
                    await self._pause_async(flow, index, backpressure)
                    if flow.caller_gone:
                        break
        finally:
            self._stop(ctx, flow)
            if agen is not None:
                await agen.aclose()
            elif hasattr(items, "close"):
                items.close()
        return self._end(ctx, index, skip, flow)

    def _fixed(self, ctx: Any, values: list, count: int) -> list[tuple]:
        """A generator function called with an integer num_returns: its items are its returns."""
        if len(values) != count:
            raise ValueError(
                f"Task {ctx.name} yielded {len(values)} objects, but num_returns={count}."
            )
        result = values[0] if count == 1 else (None if count == 0 else values)
        return self._executor.return_payloads(result, count, ctx)

    def _start(self, ctx: Any, backpressure: int, consumed: int) -> _Flow | None:
        if backpressure <= 0:
            return None
        route = self._executor.peers.route_to(ctx.conn)
        flow = self._flows[ctx.task_id] = _Flow(consumed, (ctx.conn, route))
        return flow

    def _stop(self, ctx: Any, flow: _Flow | None) -> None:
        if flow is not None:
            self._flows.pop(ctx.task_id, None)

    def _end(self, ctx: Any, index: int, skip: int, flow: _Flow | None) -> list[tuple]:
        if index < skip and not (flow is not None and flow.caller_gone):
            raise exceptions.StreamingGeneratorReplayInconsistentError(
                f"The generator task {ctx.name} yielded {index} items when run again, but "
                f"its caller had already received {skip}: its output is not deterministic."
            )
        return [_NONE_PAYLOAD]

    def _report(self, ctx: Any, index: int, value: Any) -> None:
        """Send one item to the caller, who owns it; refs inside it are lent to the caller
        before the item is sent, and kept alive here until it is."""
        executor = self._executor
        conn = ctx.conn
        caller = conn.info.get("peer_id")
        payload, refs = executor.objects.serialize_value(
            value, item_id(ctx.task_id, index), "a generator item", owner_id=caller
        )
        if refs:
            executor.ownership.lend([(r._id, r._owner) for r in refs], caller)
        executor.peers.route_to(conn).send(("gen_item", ctx.task_id, index, payload))

    def _pause(self, flow: _Flow, index: int, backpressure: int) -> None:
        """Wait until the reader took enough items (a cancel interrupts the wait)."""
        reactor = self._reactor
        while index - flow.consumed >= backpressure:
            waiter = reactor.waiter()
            flow.wake = waiter.set
            if index - flow.consumed < backpressure:
                break
            reactor.block(waiter)
        flow.wake = None

    async def _pause_async(self, flow: _Flow, index: int, backpressure: int) -> None:
        loop = asyncio.get_running_loop()
        while index - flow.consumed >= backpressure:
            acked = loop.create_future()

            def wake(future: asyncio.Future = acked) -> None:
                loop.call_soon_threadsafe(_settle, future)

            flow.wake = wake
            if index - flow.consumed < backpressure:
                break
            await acked
        flow.wake = None


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _iterable(result: Any, name: str) -> Any:
    """The iterator of a generator task's result (TypeError when it is not one)."""
    try:
        return iter(result)
    except TypeError:
        raise TypeError(
            f"Task {name} is run as a generator (num_returns='streaming' or 'dynamic'), but "
            f"it returned a {type(result).__name__}, not a generator."
        ) from None
