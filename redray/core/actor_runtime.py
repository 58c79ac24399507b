"""The actor side of actors: one instance in a dedicated worker, and how its calls run.

Three ways to run calls, chosen at creation as Ray does:
- plain actors run calls one at a time on the main thread, in arrival order (so calls from
  one caller run in submission order);
- threaded actors (`max_concurrency > 1` or concurrency groups) run each group's calls on
  that group's own threads (as many as its limit; the default group has max_concurrency);
- async actors (any `async def` method) run each concurrency group on its own event loop in
  its own thread, at most the group's limit (default group: max_concurrency, 1000 unless
  set) at a time. A synchronous method of an async actor runs on its group's loop thread,
  so a call blocking there holds up its own group only.

An actor ends on purpose in three ways: `exit_actor()` (after the running call; calls not
started fail), `__ray_terminate__` and the control loop's `actor_terminate` once nothing
refers to the actor (gracefully: no new calls are accepted, those accepted all finish, then
it exits).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import pickle
import queue
import selectors
import threading
from typing import Any

from redray import exceptions
from redray.core.executor import (
    Executor,
    TaskContext,
    _flush_streams,
    _task_context,
    error_payloads,
    interrupted_error,
    task_error,
)
from redray.transport.connection import Connection

TERMINATE = "__ray_terminate__"  # the method a handle calls to end its actor gracefully
DEFAULT_GROUP = "_default"
_TERMINATING = "the actor was terminated by __ray_terminate__"


class ActorExit(BaseException):
    """Raised by exit_actor() to leave the running method (BaseException: `except
    Exception` in user code does not swallow it)."""


def create_actor(executor: Executor, conn: Connection, message: tuple) -> None:
    """Run the constructor (on the main thread) and answer the control loop."""
    _, call_id, actor_id, spec_blob, restarts, placement = message
    spec = pickle.loads(spec_blob)
    jobs = executor.jobs
    name = spec["class_name"]
    job = spec["job"]
    jobs.jobs[job.job_id] = job
    executor._apply_grant(placement)  # GPU ids: visible to the constructor already
    ctx = executor.task_context(actor_id[:14], f"{name}.__init__", job.job_id, placement, None)
    ctx.prefix = f"({name} pid={os.getpid()})"
    executor.running.pop(ctx.task_id, None)  # the actor's own context, not a call
    runtime = ActorRuntime(executor, actor_id, spec, conn, restarts, ctx)
    executor.actor = runtime
    jobs.job_id = job.job_id
    executor.peers.handle("actor_terminate", runtime.on_terminate)
    token = _task_context.set(ctx)
    try:
        cls = jobs.load_function(spec["class_key"])
        ctx.function = cls
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


class _AsyncGroup:
    """A concurrency group of an async actor: its event loop, the thread running it, and
    its calls in progress (touched only on that loop's thread)."""

    __slots__ = ("name", "limit", "loop", "semaphore", "running", "started")

    def __init__(self, name: str, limit: int, loop: asyncio.AbstractEventLoop):
        self.name = name
        self.limit = limit
        self.loop = loop
        self.semaphore: asyncio.Semaphore | None = None  # made on the loop's thread
        self.running: dict[bytes, asyncio.Task] = {}  # calls in progress, by task id
        self.started: set[bytes] = set()  # ...of which these have begun running


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
        self.actor_name: str = spec.get("name", "")  # "" when unnamed (Ray's get_actor_name)
        self.control = control  # the control loop's connection: told when we exit on purpose
        self.restarted = restarts > 0
        self.context = ctx  # where prints go when no call is running (e.g. from user threads)
        self.grant = ctx.grant  # resources, GPU ids and placement group it runs with
        self.instance: Any = None
        self.methods: dict[str, dict] = spec["methods"]
        groups = dict(spec.get("concurrency_groups") or {})
        self.is_async = spec["is_async"]
        self.threaded = not self.is_async and (spec["max_concurrency"] > 1 or bool(groups))
        groups[DEFAULT_GROUP] = spec["max_concurrency"]
        self.groups = groups
        self._queues: dict[str, queue.SimpleQueue] = {}  # threaded: each group's inbox
        self._async_groups: dict[str, _AsyncGroup] = {}
        self._exit_reason: str | None = None  # set: accept no new calls
        self._exit_cause = ""  # what refused calls are told
        self._graceful = False  # calls accepted before the exit still run
        self._active = 0  # calls running on group threads or event loops
        self._idle = threading.Condition()

    def start(self) -> None:
        if self.is_async:
            reactor = self.executor.reactor
            ready = []
            for group, limit in self.groups.items():
                default = group == DEFAULT_GROUP
                # The default group's loop runs the worker's reactor loop while idle, so its
                # calls arrive on the thread that runs them (see _ReactorSelector).
                loop = asyncio.SelectorEventLoop(_ReactorSelector(reactor) if default else None)
                runner = self._async_groups[group] = _AsyncGroup(group, limit, loop)
                started = threading.Event()
                ready.append(started)
                threading.Thread(
                    target=self._run_loop,
                    args=(runner, started),
                    daemon=True,
                    name=f"AsyncIO Thread: {'default' if default else group}",
                ).start()
            for started in ready:
                started.wait()
        elif self.threaded:
            for group, limit in self.groups.items():
                inbox = self._queues[group] = queue.SimpleQueue()
                for i in range(limit):
                    threading.Thread(
                        target=self._serve, args=(inbox,), daemon=True, name=f"{group}-{i}"
                    ).start()

    def _run_loop(self, group: _AsyncGroup, ready: threading.Event) -> None:
        asyncio.set_event_loop(group.loop)
        group.semaphore = asyncio.Semaphore(group.limit)
        ready.set()
        group.loop.run_forever()

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
        group = self._group(method, message[8])
        if self.is_async:
            runner = self._async_groups[group]
            runner.loop.call_soon_threadsafe(self._start_async, runner, conn, message)
        else:
            self._queues[group].put((conn, message))

    def on_terminate(self, conn: Connection, message: tuple) -> None:
        """The control loop ends this actor (nothing refers to it any more): refuse new
        calls, finish those accepted, then exit."""
        if self._exit_reason is not None:
            return
        self.request_exit("its last reference is gone", graceful=True, cause=message[1])
        # Behind the calls already queued for the main thread: they run first.
        self.executor.post(conn, ("actor_task", None, TERMINATE, None, (), {}, 0, None, None, 0))

    def _call_done(self) -> None:
        with self._idle:
            self._active -= 1
            if not self._active:
                self._idle.notify_all()

    def _start_async(self, group: _AsyncGroup, conn: Connection, message: tuple) -> None:
        """On the group's loop: start a call as a task (cheaper than run_coroutine_threadsafe)."""
        group.running[message[1]] = group.loop.create_task(self._run_async(group, conn, message))

    def cancel(self, task_id: bytes) -> bool:
        """Cancel a running async call; False when it is not one (handled elsewhere)."""
        if not self.is_async:
            return False

        def cancel_on_loop(group: _AsyncGroup) -> None:
            # The call was accepted (its start queued on its loop) before this cancel was:
            # on its loop it is found here, unless it finished already.
            task = group.running.get(task_id)
            if task is None:
                return
            if task_id in group.started:
                task.cancel()
            else:
                # Not started yet (a task cancelled before its first step would never run
                # our code, so never reply): it refuses itself when it starts.
                self.executor.cancel_before_start(task_id)

        for group in self._async_groups.values():
            group.loop.call_soon_threadsafe(cancel_on_loop, group)
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
            message[1], message[3], self.spec["job"].job_id, self.grant, conn
        )
        ctx.prefix = self.context.prefix
        ctx.attempt = message[9]
        return ctx

    def execute(self, conn: Connection, message: tuple) -> None:
        """Run one call synchronously (main thread or a group's thread) and reply."""
        task_id, method, name, args, kwargs, num_returns = message[1:7]
        if method == TERMINATE:
            self._terminate(conn, message)
            return
        executor = self.executor
        if executor.refused_as_cancelled(conn, task_id, num_returns):
            return
        ctx = self._call_context(conn, message)
        main = threading.get_ident() == executor._main_thread
        if main:
            executor.current = ctx
        try:
            fn = ctx.function = self._bound(method)
            payloads = executor.invoke(ctx, fn, args, kwargs, num_returns)
        except AttributeError as exc:
            payloads = error_payloads(task_error(name, exc), num_returns)
        except ActorExit:
            payloads = error_payloads(self._exit_error(), num_returns)
        finally:
            if main:
                executor.current = None
                executor._interrupt = None
        executor.reply(conn, task_id, payloads, ctx)
        if self._exit_reason is not None and not self._graceful:
            self._exit()

    def _terminate(self, conn: Connection, message: tuple) -> None:
        """On the main thread, behind the calls accepted before: wait for the calls running
        elsewhere (group threads, event loops), reply (to a `__ray_terminate__` call), exit."""
        task_id, num_returns = message[1], message[6]
        if task_id is not None:
            if self.executor.refused_as_cancelled(conn, task_id, num_returns):
                return
            if self._exit_reason is None:
                self.request_exit(_TERMINATING, graceful=True)
        with self._idle:
            self._idle.wait_for(lambda: not self._active)
        if task_id is not None:
            ctx = self._call_context(conn, message)
            payloads = self.executor.return_payloads(None, num_returns, ctx)
            self.executor.reply(conn, task_id, payloads, ctx)
        self._exit()

    def _exit_error(self) -> exceptions.ActorDiedError:
        return exceptions.ActorDiedError(
            f"The actor {self.name} ({self.actor_id.hex()}) is dead: {self._exit_cause}",
            self.actor_id.hex(),
        )

    def _refuse(self, conn: Connection, message: tuple) -> None:
        """A call that arrives after the actor decided to exit fails as Ray's do."""
        self.executor.refuse(conn, message[1], self._exit_error(), message[6])

    async def _run_async(self, group: _AsyncGroup, conn: Connection, message: tuple) -> None:
        task_id, method, name, args, kwargs, num_returns = message[1:7]
        executor = self.executor
        group.started.add(task_id)
        try:
            # Accepted before a graceful exit: runs. After exit_actor: fails.
            if self._exit_reason is not None and not self._graceful:
                self._refuse(conn, message)
                return
            if executor.refused_as_cancelled(conn, task_id, num_returns):
                return
            ctx = self._call_context(conn, message)
            token = _task_context.set(ctx)
            try:
                async with group.semaphore:
                    fn = ctx.function = self._bound(method)
                    call_args, call_kwargs = executor.materialize_args(args, kwargs)
                    result = fn(*call_args, **call_kwargs)
                    del call_args, call_kwargs
                    if type(num_returns) is not int:  # a generator method
                        payloads = await executor.generators.run_async(ctx, result, num_returns)
                    else:
                        if inspect.isawaitable(result):
                            result = await result
                        payloads = executor.return_payloads(result, num_returns, ctx)
            except asyncio.CancelledError:  # while running or while waiting for its group
                error = exceptions.TaskCancelledError(task_id.hex())
                payloads = error_payloads(error, num_returns)
            except ActorExit:
                payloads = error_payloads(self._exit_error(), num_returns)
            except KeyboardInterrupt as exc:  # raised by the user's code: only the call fails
                payloads = error_payloads(interrupted_error(name, task_id, exc), num_returns)
            except Exception as exc:
                payloads = error_payloads(task_error(name, exc), num_returns)
            finally:
                _task_context.reset(token)
            executor.reply(conn, task_id, payloads, ctx)
            if self._exit_reason is not None and not self._graceful:
                self._exit()
        finally:
            group.started.discard(task_id)
            group.running.pop(task_id, None)
            self._call_done()

    def _bound(self, method: str) -> Any:
        try:
            return getattr(self.instance, method)
        except AttributeError:
            raise AttributeError(f"'{self.name}' object has no attribute '{method}'") from None

    # -- exiting on purpose -----------------------------------------------------------------
    def request_exit(self, reason: str, graceful: bool = False, cause: str | None = None) -> None:
        """Accept no new calls and exit: once the current call has replied (exit_actor), or
        once every call accepted before has finished (graceful)."""
        self._exit_cause = cause or f"The actor exited on purpose: {reason}."
        self._graceful = graceful
        self._exit_reason = reason

    def _exit(self) -> None:
        _flush_streams()
        if self.control is not None:
            self.control.send(("actor_exiting", self.actor_id, self._exit_reason))
        for conn in list(self.executor.reactor._connections.values()):
            conn.flush_blocking()
        os._exit(0)


class _ReactorSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The selector of an async actor's default-group event loop: while the loop has nothing
    to run, its thread runs the worker's reactor loop (Reactor.block_until_readable), so a
    call arrives on the thread that runs it instead of being handed over from the thread that
    read it (a wake-up and a GIL hand-off per call)."""

    def __init__(self, reactor: Any):
        super().__init__()
        self._reactor = reactor

    def select(self, timeout: float | None = None) -> list:
        ready = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        self._reactor.block_until_readable(self.fileno(), timeout, spin=True)
        return super().select(0)
