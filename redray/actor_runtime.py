"""The actor side of actors: one instance in a dedicated worker, and how its calls run.

Three ways to run calls, chosen at creation as Ray does:
- plain actors run calls one at a time on the main thread, in arrival order (so calls from
  one caller run in submission order);
- threaded actors (`max_concurrency > 1` or concurrency groups) run each group's calls on
  that group's own threads;
- async actors (any `async def` method) run every call as a coroutine on one event loop,
  at most `max_concurrency` (default 1000) at a time per group.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import queue
import selectors
import threading
from typing import TYPE_CHECKING, Any

from redray import exceptions
from redray.actor import TERMINATE, ActorExit
from redray.connection import Connection
from redray.executor import TaskContext, _task_context, error_payload, task_error

if TYPE_CHECKING:
    from redray.executor import Executor

DEFAULT_GROUP = "_default"
_TERMINATING = "the actor was terminated by __ray_terminate__"


def create_actor(executor: Executor, conn: Connection, message: tuple) -> None:
    """Run the constructor (on the main thread) and answer the control loop."""
    import pickle

    _, call_id, actor_id, spec_blob, restarts = message
    spec = pickle.loads(spec_blob)
    worker = executor.worker
    name = spec["class_name"]
    job = spec["job"]
    worker.jobs[job.job_id] = job
    ctx = executor.task_context(actor_id[:14], f"{name}.__init__", job.job_id, None, None)
    ctx.prefix = f"({name} pid={os.getpid()})"
    runtime = ActorRuntime(executor, actor_id, spec, conn, restarts, ctx)
    executor.actor = runtime
    worker.job_id = job.job_id
    token = _task_context.set(ctx)
    try:
        cls = worker.load_function(spec["class_key"])
        args, kwargs = executor.materialize_args(spec["args"], spec["kwargs"])
        runtime.instance = cls(*args, **kwargs)
    except Exception as exc:
        error = task_error(f"{name}.__init__", exc)
        conn.send(("reply", call_id, ("error", str(error))))
        conn.flush_blocking()
        os._exit(0)
    finally:
        _task_context.reset(token)
    runtime.start()
    conn.send(("reply", call_id, ("ok", os.getpid())))


class ActorRuntime:
    """The live actor in this process."""

    def __init__(
        self,
        executor: Executor,
        actor_id: bytes,
        spec: dict[str, Any],
        control: Connection,
        restarts: int,
        ctx: TaskContext,
    ):
        self.executor = executor
        self.actor_id = actor_id
        self.spec = spec
        self.name = spec["class_name"]
        self.control = control  # the control loop's connection: told when we exit on purpose
        self.restarted = restarts > 0
        self.context = ctx  # where prints go when no call is running (e.g. from user threads)
        self.instance: Any = None
        self.methods: dict[str, dict] = spec["methods"]
        groups = dict(spec.get("concurrency_groups") or {})
        self.is_async = spec["is_async"]
        self.threaded = not self.is_async and (spec["max_concurrency"] > 1 or bool(groups))
        groups[DEFAULT_GROUP] = spec["max_concurrency"]
        self.groups = groups
        self._queues: dict[str, queue.SimpleQueue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        self._running: dict[bytes, Any] = {}  # async calls in progress, by task id
        self._started: set[bytes] = set()  # ...of which these have begun running
        self._exit_reason: str | None = None
        self._active = 0  # calls running on group threads or the event loop
        self._idle = threading.Condition()

    def handle(self) -> Any:
        from redray.actor import ActorHandle

        worker = self.executor.worker
        info = worker.gcs.actor(self.actor_id.hex()) or {}
        return ActorHandle(self.actor_id, info)

    def start(self) -> None:
        if self.is_async:
            self._loop = asyncio.SelectorEventLoop(_ReactorSelector(self.executor.worker.reactor))
            ready = threading.Event()
            threading.Thread(
                target=self._run_loop, args=(ready,), daemon=True, name="redray-actor-loop"
            ).start()
            ready.wait()
        elif self.threaded:
            for group, limit in self.groups.items():
                inbox = self._queues[group] = queue.SimpleQueue()
                for i in range(limit):
                    threading.Thread(
                        target=self._serve, args=(inbox,), daemon=True, name=f"{group}-{i}"
                    ).start()

    def _run_loop(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        for group, limit in self.groups.items():
            self._semaphores[group] = asyncio.Semaphore(limit)
        ready.set()
        self._loop.run_forever()

    def _group(self, method: str, chosen: str | None = None) -> str:
        """The concurrency group a call runs in: chosen per call, else the method's."""
        group = chosen or (self.methods.get(method) or {}).get("concurrency_group")
        return group if group in self.groups else DEFAULT_GROUP

    # -- reactor thread ---------------------------------------------------------------------
    def accept(self, conn: Connection, message: tuple) -> None:
        """Route an incoming call to where it runs."""
        method = message[2]
        if self._exit_reason is not None:
            self._refuse(conn, message)
            return
        if method == TERMINATE or not (self.is_async or self.threaded):
            self.executor.post(conn, message)
            return
        with self._idle:
            self._active += 1
        if self.is_async:
            self._loop.call_soon_threadsafe(self._start_async, conn, message)
        else:
            self._queues[self._group(method, message[8])].put((conn, message))

    def _call_done(self) -> None:
        with self._idle:
            self._active -= 1
            if not self._active:
                self._idle.notify_all()

    def _start_async(self, conn: Connection, message: tuple) -> None:
        """On the loop: start a call as a task (cheaper than run_coroutine_threadsafe)."""
        self._running[message[1]] = self._loop.create_task(self._run_async(conn, message))

    def cancel(self, task_id: bytes) -> bool:
        """Cancel a running async call; False when it is not one (handled elsewhere)."""
        if not self.is_async:
            return False

        def cancel_on_loop() -> None:
            task = self._running.get(task_id)
            if task is not None and task_id in self._started:
                task.cancel()
            else:
                # Not started yet (a task cancelled before its first step would never run
                # our code, so never reply): it refuses itself when it starts.
                self.executor._cancelled.add(task_id)

        self._loop.call_soon_threadsafe(cancel_on_loop)
        return True

    def on_connection_lost(self, conn: Connection) -> None:
        if conn is self.control:
            # The control loop (head) is gone; a new one reconnects to us. Keep serving.
            self.control = None

    # -- running calls ----------------------------------------------------------------------
    def _serve(self, inbox: queue.SimpleQueue) -> None:
        while True:
            conn, message = inbox.get()
            try:
                self.execute(conn, message)
            finally:
                self._call_done()

    def _call_context(self, conn: Connection, message: tuple) -> TaskContext:
        # Prints of an actor go to the driver of the job that created it (as Ray does).
        ctx = self.executor.task_context(
            message[1], message[3], self.spec["job"].job_id, None, conn
        )
        ctx.prefix = self.context.prefix
        return ctx

    def execute(self, conn: Connection, message: tuple) -> None:
        """Run one call synchronously (main thread or a group's thread) and reply."""
        task_id, method, name, args, kwargs, num_returns = message[1:7]
        executor = self.executor
        if executor.refused_as_cancelled(conn, task_id, num_returns):
            return
        ctx = self._call_context(conn, message)
        if method == TERMINATE:
            # Graceful: refuse new calls, let the running ones finish, then go.
            self.request_exit(_TERMINATING)
            with self._idle:
                self._idle.wait_for(lambda: not self._active)
            payloads = executor.return_payloads(None, num_returns, ctx)
        else:
            main = threading.get_ident() == executor._main_thread
            if main:
                executor.current = ctx
            try:
                payloads = executor.invoke(
                    ctx, self._bound(method, name), args, kwargs, num_returns
                )
            except ActorExit:
                payloads = [error_payload(self._exit_error())] * num_returns
            finally:
                if main:
                    executor.current = None
                    executor._interrupt = None
        conn.send(("done", task_id, payloads, executor.worker.take_task_borrows()))
        if self._exit_reason is not None and (
            method == TERMINATE or self._exit_reason != _TERMINATING
        ):
            self._exit()

    def _exit_error(self) -> exceptions.ActorDiedError:
        return exceptions.ActorDiedError(
            f"The actor {self.name} is dead: it exited on purpose ({self._exit_reason}).",
            self.actor_id.hex(),
        )

    def _refuse(self, conn: Connection, message: tuple) -> None:
        """A call that arrives after the actor decided to exit fails as Ray's do."""
        conn.send(("done", message[1], [error_payload(self._exit_error())] * message[6], []))

    async def _run_async(self, conn: Connection, message: tuple) -> None:
        task_id, method, name, args, kwargs, num_returns = message[1:7]
        executor = self.executor
        self._started.add(task_id)
        try:
            # Accepted before __ray_terminate__: runs (it waits for us). After exit_actor: fails.
            if self._exit_reason is not None and self._exit_reason != _TERMINATING:
                self._refuse(conn, message)
                return
            if executor.refused_as_cancelled(conn, task_id, num_returns):
                return
            ctx = self._call_context(conn, message)
            token = _task_context.set(ctx)
            try:
                async with self._semaphores[self._group(method, message[8])]:
                    fn = self._bound(method, name)
                    call_args, call_kwargs = executor.materialize_args(args, kwargs)
                    result = fn(*call_args, **call_kwargs)
                    if inspect.isawaitable(result):
                        result = await result
                    payloads = executor.return_payloads(result, num_returns, ctx)
            except asyncio.CancelledError:  # while running or while waiting for its group
                error = exceptions.TaskCancelledError(task_id.hex())
                payloads = [error_payload(error)] * num_returns
            except ActorExit:
                payloads = [error_payload(self._exit_error())] * num_returns
            except Exception as exc:
                payloads = [error_payload(task_error(name, exc))] * num_returns
            finally:
                _task_context.reset(token)
            conn.send(("done", task_id, payloads, executor.worker.take_task_borrows()))
            if self._exit_reason is not None and self._exit_reason != _TERMINATING:
                self._exit()
        finally:
            self._started.discard(task_id)
            self._running.pop(task_id, None)
            self._call_done()

    def _bound(self, method: str, name: str) -> Any:
        try:
            return getattr(self.instance, method)
        except AttributeError:
            raise AttributeError(f"'{self.name}' object has no attribute '{method}'") from None

    # -- exiting on purpose -----------------------------------------------------------------
    def request_exit(self, reason: str) -> None:
        """Exit once the current call has replied (exit_actor / __ray_terminate__)."""
        self._exit_reason = reason

    def _exit(self) -> None:
        from redray.executor import _flush_streams

        _flush_streams()
        if self.control is not None:
            self.control.send(("actor_exiting", self.actor_id, self._exit_reason))
        for conn in list(self.executor.worker.reactor._connections.values()):
            conn.flush_blocking()
        os._exit(0)


class _ReactorSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The selector of an async actor's event loop: while the loop has nothing to run, its
    thread runs the worker's reactor loop (Reactor.block_until_readable), so a call arrives
    on the thread that runs it instead of being handed over from the thread that read it (a
    wake-up and a GIL hand-off per call)."""

    def __init__(self, reactor: Any):
        super().__init__()
        self._reactor = reactor

    def select(self, timeout: float | None = None) -> list:
        ready = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        self._reactor.block_until_readable(self.fileno(), timeout, spin=True)
        return super().select(0)
